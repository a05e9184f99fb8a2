"""The peers `shardprop bench convergence` races to a target loss: scikit-learn's MLP (lbfgs,
and adam on full batches) and PyTorch (LBFGS with a strong-Wolfe line search, and Adam on
full batches), each from our start: our rows standardised as our workers hold them, our
initial weights, no L2. PyTorch is imported only where it runs, and is optional.

Every loss here is the workers' own: the mean over the rows of binary or multiclass
cross-entropy, or half the squared error of standardised targets (scikit-learn's
MLPRegressor loss, and ours before it is put back in the label's units).
"""

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from shardprop.service.bench.peers import torch_network

if TYPE_CHECKING:  # optional packages: imported where a peer runs
    import torch
    from sklearn.neural_network import MLPClassifier, MLPRegressor

SKLEARN = "scikit-learn"
TORCH = "PyTorch"
SKLEARN_LBFGS_ITERATIONS = 200  # scikit-learn's own default max_iter for its lbfgs


@dataclass(frozen=True)
class Start:
    """What every system starts from."""

    X: np.ndarray  # (rows, features), standardised as the workers hold them
    y: np.ndarray  # (rows,): 0/1, the class's index, or the standardised target
    task: str  # binary, multiclass or regression
    blocks: list[np.ndarray]  # our initial weights [W_l | b_l], each (n_l, n_{l-1} + 1)
    loss: float  # ours at those weights
    label_units: float  # our logged loss over the workers' (a regression's target variance)


@dataclass
class Race:
    """One system's run towards the target: when it got there, or how far it got."""

    system: str  # shardprop, scikit-learn or PyTorch
    method: str  # lbfgs, adam or gd
    where: str  # 2 Ray workers, in-process
    seconds: float | None  # from its first step to the target; None: not reached
    steps: int  # steps (iterations, epochs) taken to the target, or in all when not reached
    run_seconds: float  # the whole run, however it ended
    best_loss: float  # the lowest loss it saw
    start_loss: float | None = None  # at the starting weights, where the peer reports it
    evals: int | None = None  # loss and gradient evaluations, where known
    how: str = ""  # how `seconds` was taken, where it is not a clock read at the target
    # step by step where the system logs it (ours): the loss and the seconds it was known at
    curve_losses: list[float] = field(default_factory=list)
    curve_seconds: list[float] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return self.seconds is not None


def losses_to_target(
    losses: list[float], seconds: list[float], target: float
) -> tuple[float | None, int]:
    """The seconds at the first loss at most `target`, and its index (or the count)."""
    for i, loss in enumerate(losses):
        if loss <= target:
            return seconds[i], i
    return None, len(losses)


def sklearn_model(start: Start, solver: str, **options: Any) -> "MLPClassifier | MLPRegressor":
    """scikit-learn's MLP holding our initial weights, set to go on from them: fitted once on
    a few rows to build its layers (every class among them), then given our weights through
    its public coefs_ and intercepts_, warm_start on."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    kind = MLPRegressor if start.task == "regression" else MLPClassifier
    model = kind(
        hidden_layer_sizes=tuple(block.shape[0] for block in start.blocks[:-1]),
        activation="relu",
        solver=solver,
        alpha=0.0,
        shuffle=False,
        random_state=0,
        max_iter=1,
    )
    few = np.arange(min(10, len(start.y)))
    if kind is MLPClassifier:
        few = np.union1d(few, np.unique(start.y, return_index=True)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(start.X[few], start.y[few])
    model.coefs_ = [block[:, :-1].T.astype(start.X.dtype) for block in start.blocks]
    model.intercepts_ = [block[:, -1].astype(start.X.dtype) for block in start.blocks]
    model.set_params(warm_start=True, **options)
    return model


def sklearn_lbfgs(start: Start) -> Race:
    """scikit-learn's lbfgs with its defaults (stops at tol 1e-4 or 200 iterations): its
    final loss is the target, and its whole fit the time to it."""
    from sklearn.exceptions import ConvergenceWarning

    model = sklearn_model(start, "lbfgs", max_iter=SKLEARN_LBFGS_ITERATIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # its cap: said in the table
        began = time.perf_counter()
        model.fit(start.X, start.y)
        seconds = time.perf_counter() - began
    how = "its whole fit"
    if model.n_iter_ >= SKLEARN_LBFGS_ITERATIONS:
        how += f", stopped at its cap of {SKLEARN_LBFGS_ITERATIONS} iterations"
    loss = float(model.loss_)
    return Race(SKLEARN, "lbfgs", "in-process", seconds, model.n_iter_, seconds, loss, how=how)


def sklearn_adam(start: Start, learning_rate: float, target: float, epochs: int) -> Race:
    """scikit-learn's adam, one batch of all rows per epoch, at most `epochs` epochs with its
    own stopping rule off. It reports no time per epoch: the time to the target is the fit's
    time per epoch times the epochs its loss_curve_ took to reach it."""
    from sklearn.exceptions import ConvergenceWarning

    model = sklearn_model(
        start,
        "adam",
        batch_size=len(start.y),
        learning_rate_init=learning_rate,
        max_iter=epochs,
        n_iter_no_change=epochs,
        tol=0.0,
    )
    before = len(model.loss_curve_)  # the curve goes on from the fit that built the layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        began = time.perf_counter()
        model.fit(start.X, start.y)
        seconds = time.perf_counter() - began
    curve = [float(loss) for loss in model.loss_curve_[before:]]
    per_epoch = seconds / len(curve)
    # epoch i's loss is at its starting weights, known once that epoch's pass is done
    ends = [per_epoch * (i + 1) for i in range(len(curve))]
    to_target, epoch = losses_to_target(curve, ends, target)
    how = "epochs x its fit's time per epoch"
    return Race(
        SKLEARN, "adam", "in-process", to_target, epoch, seconds, min(curve), curve[0], how=how
    )


def torch_loss(start: Start) -> tuple[Any, Any, Any]:
    """The rows as tensors and the loss on our definition: mean cross-entropy on logits, or
    half the mean squared error."""
    import torch

    X = torch.from_numpy(start.X)
    if start.task == "multiclass":
        return X, torch.from_numpy(start.y.astype(np.int64)), torch.nn.CrossEntropyLoss()
    y = torch.from_numpy(start.y.astype(start.X.dtype))
    if start.task == "binary":
        loss = torch.nn.BCEWithLogitsLoss()
        return X, y, lambda logits, y: loss(logits.squeeze(1), y)
    squared = torch.nn.MSELoss()
    return X, y, lambda Z, y: 0.5 * squared(Z.squeeze(1), y)


def torch_problem(start: Start, threads: int) -> tuple[Any, Any, Any, Any, Any] | None:
    """torch on `threads` threads, the rows, the loss and the network holding our weights;
    None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    X, y, loss_of = torch_loss(start)
    return torch, X, y, loss_of, torch_network(start.blocks)


class TargetReachedError(Exception):
    """Raised from PyTorch's LBFGS closure: the loss is at the target, the race is over."""


def torch_lbfgs(start: Start, threads: int, target: float, steps: int) -> Race | None:
    """torch.optim.LBFGS (history 10, as ours and scikit-learn's; strong-Wolfe line search),
    at most `steps` iterations in one call, so its line search's last point carries on; the
    race ends at the first evaluation, line-search trials included, at most the target."""
    problem = torch_problem(start, threads)
    if problem is None:
        return None
    torch, X, y, loss_of, model = problem
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=steps,
        max_eval=5 * steps,
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    losses: list[float] = []
    seconds: list[float] = []

    def closure() -> "torch.Tensor":
        optimizer.zero_grad()
        loss = loss_of(model(X), y)
        loss.backward()
        losses.append(float(loss.item()))
        seconds.append(time.perf_counter() - began)
        if losses[-1] <= target:
            raise TargetReachedError
        return loss

    began = time.perf_counter()
    with contextlib.suppress(TargetReachedError):
        optimizer.step(closure)
    run_seconds = time.perf_counter() - began
    state = optimizer.state_dict()["state"][0]
    to_target, _ = losses_to_target(losses, seconds, target)
    return Race(
        TORCH,
        "lbfgs",
        "in-process",
        to_target,
        int(state["n_iter"]),
        run_seconds,
        min(losses),
        losses[0],
        evals=len(losses),
    )


def torch_adam(
    start: Start, threads: int, learning_rate: float, target: float, steps: int
) -> Race | None:
    """torch.optim.Adam on the full batch, the loss read at every step before its update."""
    problem = torch_problem(start, threads)
    if problem is None:
        return None
    torch, X, y, loss_of, model = problem
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    losses: list[float] = []
    seconds: list[float] = []
    began = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model(X), y)
        loss.backward()
        losses.append(float(loss.item()))
        seconds.append(time.perf_counter() - began)
        if losses[-1] <= target:
            break
        optimizer.step()
    run_seconds = time.perf_counter() - began
    to_target, step = losses_to_target(losses, seconds, target)
    return Race(TORCH, "adam", "in-process", to_target, step, run_seconds, min(losses), losses[0])
