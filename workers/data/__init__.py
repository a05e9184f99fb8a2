"""What a worker reads: table sources, synthetic sets, and how rows are split."""
