"""Output layers with their losses. Every one gives dZ[L] = A[L] - Y.

Each `loss_and_delta` returns the loss SUMMED over the shard's rows (not the mean): shards
differ in size, so only sums add up to the full-batch loss.
"""

from typing import Protocol

import numpy as np

from shardprop.workers.network.activations import sigmoid


def sum_of_squares(x: np.ndarray) -> float:
    """x . x for a vector, by numpy's own loop rather than BLAS: OpenBLAS runs a long dot on
    all its threads, which then spin on the cores the workers compute on."""
    return float(np.einsum("i,i->", x, x))


class Output(Protocol):
    def loss_and_delta(self, Z: np.ndarray, Y: np.ndarray, dZ: np.ndarray) -> float:
        """Fill dZ with A - Y for logits Z (n_L, m); return the loss sum."""

    def predict(self, Z: np.ndarray) -> np.ndarray:
        """The output activation A[L] of logits Z (n_L, m), as a new array."""

    def correct(self, Z: np.ndarray, Y: np.ndarray) -> int | None:
        """How many rows are classified right; None for regression."""


class BinaryOutput:
    """Sigmoid + binary cross-entropy L = -[y log a + (1 - y) log(1 - a)]."""

    def loss_and_delta(self, Z: np.ndarray, Y: np.ndarray, dZ: np.ndarray) -> float:
        np.copyto(dZ, Z)
        sigmoid(dZ)
        dZ -= Y
        # L = softplus(z) - y z, with softplus(z) = max(z, 0) + log(1 + e^-|z|): the
        # log-sum-exp form, finite for any finite logit
        loss = np.maximum(Z, 0) - Y * Z + np.log1p(np.exp(-np.abs(Z)))
        return float(loss.sum(dtype=np.float64))

    def predict(self, Z: np.ndarray) -> np.ndarray:
        A = Z.copy()
        sigmoid(A)
        return A

    def correct(self, Z: np.ndarray, Y: np.ndarray) -> int:
        return int(np.count_nonzero((Z > 0) == (Y > 0.5)))


class MulticlassOutput:
    """Softmax + cross-entropy over one-hot targets Y (K, m)."""

    def loss_and_delta(self, Z: np.ndarray, Y: np.ndarray, dZ: np.ndarray) -> float:
        shifted = Z - Z.max(axis=0)  # max-shifted: exp never overflows
        np.exp(shifted, out=dZ)
        total = dZ.sum(axis=0)  # (m,)
        dZ /= total
        dZ -= Y
        # -log softmax(z)_y = log sum_j e^(z_j) - z_y, with the same shift on both terms
        return float(np.log(total).sum(dtype=np.float64) - (Y * shifted).sum(dtype=np.float64))

    def predict(self, Z: np.ndarray) -> np.ndarray:
        A = np.exp(Z - Z.max(axis=0))
        A /= A.sum(axis=0)
        return A

    def correct(self, Z: np.ndarray, Y: np.ndarray) -> int:
        if Z.shape[1] == 0:
            return 0
        return int(np.count_nonzero(Z.argmax(axis=0) == Y.argmax(axis=0)))


class RegressionOutput:
    """Identity + half squared error L = 1/2 (a - y)^2."""

    def loss_and_delta(self, Z: np.ndarray, Y: np.ndarray, dZ: np.ndarray) -> float:
        np.subtract(Z, Y, out=dZ)
        return 0.5 * sum_of_squares(dZ.ravel())

    def predict(self, Z: np.ndarray) -> np.ndarray:
        return Z.copy()

    def correct(self, Z: np.ndarray, Y: np.ndarray) -> None:
        return None


OUTPUTS: dict[str, Output] = {
    "binary": BinaryOutput(),
    "multiclass": MulticlassOutput(),
    "regression": RegressionOutput(),
}


def l2_penalty(theta: np.ndarray, weight_mask: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """The data-free term l2/2 ||W||^2 over the weights (not biases): loss and gradient.

    Added once to the mean gradient after the reduce, never by a worker.
    """
    weights = np.where(weight_mask, theta, 0)
    return 0.5 * l2 * sum_of_squares(weights), l2 * weights
