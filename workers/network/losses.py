"""Output layers with their losses. Every one gives dZ[L] = A[L] - Y.

Each `loss_and_delta` returns the loss SUMMED over the shard's rows (not the mean): shards
differ in size, so only sums add up to the full-batch loss.
"""

import math
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

    def tallies(self, Z: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """The counts and sums the task's metrics are made of, SUMMED over the rows of Z
        (n_L, m): a float64 vector whose length depends on the task and n_L alone."""

    def correct(self, tallies: np.ndarray) -> int | None:
        """How many rows are classified right, read off their tallies; None for regression."""


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

    def tallies(self, Z: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """[tn, fp, fn, tp]: predicted positive where z > 0, that is a > 1/2."""
        cell = 2 * (Y[0] > 0.5) + (Z[0] > 0)  # true row, predicted column
        return confusion(cell, 2)

    def correct(self, tallies: np.ndarray) -> int:
        return int(tallies[0] + tallies[3])


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

    def tallies(self, Z: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """The K x K confusion matrix, rows the true class, flattened row-major."""
        K = Z.shape[0]
        if Z.shape[1] == 0:
            return np.zeros(K * K)
        return confusion(Y.argmax(axis=0) * K + Z.argmax(axis=0), K)

    def correct(self, tallies: np.ndarray) -> int:
        K = math.isqrt(tallies.size)
        return int(tallies[:: K + 1].sum())  # the diagonal


class RegressionOutput:
    """Identity + half squared error L = 1/2 (a - y)^2."""

    def loss_and_delta(self, Z: np.ndarray, Y: np.ndarray, dZ: np.ndarray) -> float:
        np.subtract(Z, Y, out=dZ)
        return 0.5 * sum_of_squares(dZ.ravel())

    def predict(self, Z: np.ndarray) -> np.ndarray:
        return Z.copy()

    def tallies(self, Z: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """[sum |a - y|, sum (a - y)^2, sum y, sum y^2] over every element, in float64:
        MAE, RMSE and R^2 of any set of rows follow from these sums."""
        error = (Z - Y).ravel()
        y = Y.ravel()
        return np.array(
            [
                np.abs(error).sum(dtype=np.float64),
                np.einsum("i,i->", error, error, dtype=np.float64),
                y.sum(dtype=np.float64),
                np.einsum("i,i->", y, y, dtype=np.float64),
            ]
        )

    def correct(self, tallies: np.ndarray) -> None:
        return None


def confusion(cell: np.ndarray, K: int) -> np.ndarray:
    """Counts of each cell index true * K + predicted of a K x K confusion matrix, as float64
    (sums of whole numbers stay exact far beyond any row count)."""
    return np.bincount(cell, minlength=K * K).astype(np.float64)


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
