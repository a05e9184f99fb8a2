"""The peers `shardprop bench` times beside our step: scikit-learn's full-batch epoch and
PyTorch's eager step, from the same weights on the same rows, where they are installed.

Light on purpose (numpy only): Ray Train's workers import it for `torch_network`.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shardprop.service.bench.timing import Timing

if TYPE_CHECKING:  # an optional package: imported where a peer runs
    import torch

SKLEARN_EPOCH = "scikit-learn MLPClassifier epoch"
TORCH_STEP = "PyTorch CPU eager step"


@dataclass(frozen=True)
class SameStart:
    """What a peer starts from: our rows, standardised as our workers hold them, our initial
    weights and our learning rate."""

    X: np.ndarray  # (rows, features): rows first, as scikit-learn and torch want them
    y: np.ndarray  # (rows,): 0 or 1
    blocks: list[np.ndarray]  # [W_l | b_l], each (n_l, n_{l-1} + 1)
    learning_rate: float


def sklearn_epoch(start: SameStart, repeats: int) -> tuple[Timing, float] | None:
    """scikit-learn's MLPClassifier, one full-batch SGD epoch (batch_size = all rows,
    momentum 0, no L2): its time, and its loss at the starting weights. None without
    scikit-learn."""
    try:
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        return None
    y = start.y.astype(np.int64)
    model = MLPClassifier(
        hidden_layer_sizes=tuple(block.shape[0] for block in start.blocks[:-1]),
        activation="relu",
        solver="sgd",
        batch_size=len(y),
        learning_rate_init=start.learning_rate,
        momentum=0.0,
        alpha=0.0,
        shuffle=False,
    )
    model.partial_fit(start.X[:2], y[:2], classes=[0, 1])  # shapes and dtypes only

    def epoch() -> None:
        model.coefs_ = [block[:, :-1].T.astype(start.X.dtype) for block in start.blocks]
        model.intercepts_ = [block[:, -1].astype(start.X.dtype) for block in start.blocks]
        model.partial_fit(start.X, y)

    (timing,) = Timing.alternating([epoch], repeats)
    epoch()
    return timing, float(model.loss_)


def torch_step(start: SameStart, threads: int, repeats: int) -> tuple[Timing, float] | None:
    """PyTorch CPU eager, the same model, one full-batch SGD step on `threads` threads: its
    time, and its loss at the starting weights. None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    X, y = torch.from_numpy(start.X), torch.from_numpy(start.y)
    model = torch_network(start.blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=start.learning_rate, momentum=0.0)
    loss_of = torch.nn.BCEWithLogitsLoss()

    def one_step() -> float:
        load_blocks(model, start.blocks)  # every step from the same weights
        optimizer.zero_grad()
        loss = loss_of(model(X).squeeze(1), y)
        loss.backward()
        optimizer.step()
        return float(loss.item())

    (timing,) = Timing.alternating([one_step], repeats)
    return timing, one_step()


def torch_network(blocks: list[np.ndarray]) -> "torch.nn.Sequential":
    """Linear layers holding our weights, relu between them; logits out (the loss takes them)."""
    import torch

    layers: list[torch.nn.Module] = []
    for block in blocks:
        n_out, n_in = block.shape[0], block.shape[1] - 1
        dtype = torch.from_numpy(block[:0]).dtype
        layers += [torch.nn.Linear(n_in, n_out, dtype=dtype), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    load_blocks(model, blocks)
    return model


def load_blocks(model: "torch.nn.Sequential", blocks: list[np.ndarray]) -> None:
    """Our weights [W_l | b_l] into the network's Linear layers (every other layer)."""
    import torch

    with torch.no_grad():
        for linear, block in zip(model[::2], blocks, strict=True):
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(block[:, :-1])))
            linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(block[:, -1])))
