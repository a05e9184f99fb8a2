"""When to stop before the last step: on the validation loss (early stopping) or on the
training loss (a plateau). Policies that decide, tested without any workers."""

import math

import numpy as np


class EarlyStopping:
    """Remembers the parameters with the lowest val_loss; says stop after `patience`
    evaluations in a row without a lower one. `patience=None` never stops."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.best_theta: np.ndarray | None = None
        self.waited = 0

    def update(self, step: int, val_loss: float, theta: np.ndarray) -> bool:
        """Record one evaluation of `theta` (the parameters val_loss was measured at);
        returns whether to stop now."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_step, self.waited = val_loss, step, 0
            self.best_theta = theta.copy()
            return False
        self.waited += 1
        return self.patience is not None and self.waited >= self.patience

    def state(self) -> dict[str, np.ndarray]:
        """For a checkpoint: resuming must stop where an uninterrupted run would."""
        best = self.best_theta if self.best_theta is not None else np.empty(0)
        return {
            "best_loss": np.array(self.best_loss),
            "best_step": np.array(-1 if self.best_step is None else self.best_step),
            "waited": np.array(self.waited),
            "best_theta": best,
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_step = None if int(state["best_step"]) < 0 else int(state["best_step"])
        self.waited = int(state["waited"])
        self.best_theta = state["best_theta"].copy() if state["best_theta"].size else None


class Plateau:
    """scikit-learn's stopping rule on the training loss: stop once it has not gone below
    its best minus `tolerance` for more than `patience` steps in a row. `tolerance=None`
    never stops."""

    def __init__(self, tolerance: float | None, patience: int):
        self.tolerance, self.patience = tolerance, patience
        self.best_loss = math.inf
        self.waited = 0

    def update(self, loss: float) -> bool:
        """Record one step's loss; returns whether to stop now."""
        if self.tolerance is None:
            return False
        self.waited = self.waited + 1 if loss > self.best_loss - self.tolerance else 0
        self.best_loss = min(self.best_loss, loss)
        return self.waited > self.patience

    def state(self) -> dict[str, np.ndarray]:
        return {"best_loss": np.array(self.best_loss), "waited": np.array(self.waited)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.best_loss, self.waited = float(state["best_loss"]), int(state["waited"])
