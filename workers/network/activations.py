"""Hidden-layer activations, each beside its derivative.

Every function works in place. A forward function turns the pre-activation Z held in its
buffer into A = g(Z). A derivative function multiplies dA (in place) by g'(Z), written in
terms of A = g(Z): that is all backward needs, so the forward pass keeps only A.
"""

from collections.abc import Callable

import numpy as np

LEAKY_SLOPE = 0.01

Forward = Callable[[np.ndarray], None]
Derivative = Callable[[np.ndarray, np.ndarray], None]


def identity(Z: np.ndarray) -> None:
    pass


def identity_derivative(A: np.ndarray, dA: np.ndarray) -> None:
    pass


def relu(Z: np.ndarray) -> None:
    np.maximum(Z, 0, out=Z)


def relu_derivative(A: np.ndarray, dA: np.ndarray) -> None:
    # g'(Z) = 1 where A > 0; A == 0 exactly where Z <= 0
    np.multiply(dA, A > 0, out=dA)


def leaky_relu(Z: np.ndarray) -> None:
    # max(Z, slope * Z) is Z for Z > 0 and slope * Z below, since 0 < slope < 1
    np.maximum(Z, Z * LEAKY_SLOPE, out=Z)


def leaky_relu_derivative(A: np.ndarray, dA: np.ndarray) -> None:
    # A has the sign of Z
    np.multiply(dA, np.where(A > 0, 1.0, LEAKY_SLOPE).astype(dA.dtype, copy=False), out=dA)


def tanh(Z: np.ndarray) -> None:
    np.tanh(Z, out=Z)


def tanh_derivative(A: np.ndarray, dA: np.ndarray) -> None:
    # g'(Z) = 1 - A^2
    dA -= dA * A * A


def sigmoid(Z: np.ndarray) -> None:
    # 1/2 (1 + tanh(Z/2)) equals 1/(1 + e^-Z) and never overflows
    Z *= 0.5
    np.tanh(Z, out=Z)
    Z += 1
    Z *= 0.5


def sigmoid_derivative(A: np.ndarray, dA: np.ndarray) -> None:
    # g'(Z) = A (1 - A)
    dA *= A * (1 - A)


ACTIVATIONS: dict[str, Forward] = {
    "identity": identity,
    "relu": relu,
    "leaky_relu": leaky_relu,
    "tanh": tanh,
    "sigmoid": sigmoid,
}

DERIVATIVES: dict[str, Derivative] = {
    "identity": identity_derivative,
    "relu": relu_derivative,
    "leaky_relu": leaky_relu_derivative,
    "tanh": tanh_derivative,
    "sigmoid": sigmoid_derivative,
}
