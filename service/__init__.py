"""The coordinator side of shardprop: CLI, config, data plan, training loop, tracking.

`shardprop.service.train(...)` trains from Python (service/api.py); it loads on first use,
so that importing one part of the package does not import the training loop.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "train":
        from shardprop.service.api import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
