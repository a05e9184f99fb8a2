"""The shard contract's sums and the exact reduction's block tree."""
