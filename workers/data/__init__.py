"""What a worker reads: table sources, synthetic sets, the validation split."""
