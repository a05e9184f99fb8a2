"""A training run: plan -> worker group -> loop -> outputs, and its parts."""
