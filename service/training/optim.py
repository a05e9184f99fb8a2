"""Optimizers on the flat parameter vector: one vectorised in-place update per step, at the
step's learning rate (training/schedule.py). L-BFGS, which searches along a line with
evaluations of its own, is in training/lbfgs.py.

Their state is a dict of arrays (plus the step count) so a checkpoint can hold it.
"""

from typing import Protocol

import numpy as np

from shardprop.service.config import TrainConfig
from shardprop.service.training.lbfgs import LBFGS


class Optimizer(Protocol):
    def step(self, theta: np.ndarray, grad: np.ndarray, learning_rate: float) -> None:
        """Update theta in place from the mean gradient."""

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


class GradientDescent:
    def step(self, theta: np.ndarray, grad: np.ndarray, learning_rate: float) -> None:
        theta -= learning_rate * grad

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        pass


class Momentum:
    """Heavy ball, as PyTorch's SGD: v <- mu v + g; theta <- theta - lr v."""

    def __init__(self, momentum: float, size: int, dtype: np.dtype):
        self.momentum = momentum
        self.velocity = np.zeros(size, dtype=dtype)

    def step(self, theta: np.ndarray, grad: np.ndarray, learning_rate: float) -> None:
        self.velocity *= self.momentum
        self.velocity += grad
        theta -= learning_rate * self.velocity

    def state(self) -> dict[str, np.ndarray]:
        return {"velocity": self.velocity.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.velocity[...] = state["velocity"]


class Adam:
    """Adam (Kingma & Ba) with bias correction, epsilon placed as in PyTorch."""

    def __init__(self, beta1: float, beta2: float, epsilon: float, size: int, dtype: np.dtype):
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.m = np.zeros(size, dtype=dtype)
        self.v = np.zeros(size, dtype=dtype)
        self.t = 0

    def step(self, theta: np.ndarray, grad: np.ndarray, learning_rate: float) -> None:
        self.t += 1
        self.m *= self.beta1
        self.m += (1 - self.beta1) * grad
        self.v *= self.beta2
        self.v += (1 - self.beta2) * grad * grad
        # as PyTorch: epsilon is added to the bias-corrected sqrt(v)
        m_hat = self.m / (1 - self.beta1**self.t)
        v_hat = self.v / (1 - self.beta2**self.t)
        theta -= learning_rate * m_hat / (np.sqrt(v_hat) + self.epsilon)

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self.m.copy(), "v": self.v.copy(), "t": np.array(self.t)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.m[...] = state["m"]
        self.v[...] = state["v"]
        self.t = int(state["t"])


def make_optimizer(config: TrainConfig, size: int, dtype: np.dtype) -> Optimizer | LBFGS:
    if config.optimizer == "lbfgs":
        return LBFGS(config.history_size, size)
    if config.optimizer == "momentum":
        return Momentum(config.momentum, size, dtype)
    if config.optimizer == "adam":
        return Adam(config.beta1, config.beta2, config.epsilon, size, dtype)
    return GradientDescent()
