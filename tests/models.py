"""A tiny model's files, for the tests that log a model without training one."""

from pathlib import Path

import numpy as np

from shardprop.workers.network.params import Layout, init_params, save_weights

# the meta of a 2 -> 3 -> 1 binary network on features a and b, label y
TINY_META = {
    "sizes": [2, 3, 1],
    "activation": "relu",
    "task": "binary",
    "dtype": "float64",
    "features": ["a", "b"],
    "label": "y",
    "mean": None,
    "std": None,
    "classes": None,
}


def tiny_weights(path: Path) -> Path:
    """He-initialised weights of TINY_META's network, saved at `path`."""
    layout = Layout(tuple(TINY_META["sizes"]))
    return save_weights(path, layout, init_params(layout, "he", 0, np.float64))
