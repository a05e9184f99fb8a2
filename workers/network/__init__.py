"""The network's math (activations, losses, parameters, forward and backward) and how a
shard's columns are cut into chunks and spread over threads (chunks.py)."""
