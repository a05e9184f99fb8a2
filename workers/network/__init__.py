"""The network's math: activations, losses, parameters, forward and backward."""
