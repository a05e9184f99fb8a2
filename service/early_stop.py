"""Early stopping on the validation loss: a policy that decides, tested without any workers."""

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
