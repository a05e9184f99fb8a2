"""Known answers, numerical stability and prediction of the network."""

import numpy as np
import pytest

from shardprop.workers.network.backprop import Architecture, Batch, Network
from shardprop.workers.network.losses import OUTPUTS, l2_penalty
from shardprop.workers.network.params import Layout, from_arrays, init_params


def test_tiny_2_2_1_network_matches_hand_computed_answer():
    # Two samples through tanh hidden units and a sigmoid output, worked out with scalar
    # formulas: z = w.x + b, a = tanh(z), dz2 = a2 - y, dz1 = w2 dz2 (1 - a1^2).
    layout = Layout((2, 2, 1))
    arrays = {
        "W1": np.array([[0.1, -0.2], [0.3, 0.4]]),
        "b1": np.array([0.05, -0.05]),
        "W2": np.array([[0.5, -0.6]]),
        "b2": np.array([0.1]),
    }
    theta = from_arrays(layout, arrays, np.float64)
    X = np.array([[1.0, -1.0], [2.0, 0.5]])  # samples are columns
    Y = np.array([[1.0, 0.0]])
    sums = Network(Architecture((2, 2, 1), "tanh", "binary"), threads=1).gradient(
        theta, Batch(X, Y)
    )
    grads = dict(
        zip(
            ["W1", "b1", "W2", "b2"],
            [
                layout.weights(sums.grad)[0],
                layout.biases(sums.grad)[0],
                layout.weights(sums.grad)[1],
                layout.biases(sums.grad)[1],
            ],
            strict=True,
        )
    )
    assert sums.loss == pytest.approx(1.7210617923256653, rel=1e-14)
    np.testing.assert_allclose(
        grads["W1"],
        [[-0.5501110657834765, -0.4540081051268659], [0.4549180635455241, 0.13437929536294405]],
        rtol=1e-13,
    )
    np.testing.assert_allclose(
        grads["b1"], [-0.033139844631406845, -0.16544740183695925], rtol=1e-13
    )
    np.testing.assert_allclose(
        grads["W2"], [[0.07325054168659699, -0.5638014191717016]], rtol=1e-13
    )
    np.testing.assert_allclose(grads["b2"], [-0.09177931595520494], rtol=1e-13)
    assert sums.rows == 2
    assert sums.correct == 0  # both samples land on the wrong side
    np.testing.assert_array_equal(sums.tallies, [0, 1, 1, 0])  # tn, fp, fn, tp


def test_binary_loss_uses_the_minus_on_both_terms():
    # L = -[y log a + (1 - y) log(1 - a)]: with a = sigmoid(0) = 1/2 both labels cost log 2
    dZ = np.empty((1, 2))
    loss = OUTPUTS["binary"].loss_and_delta(np.zeros((1, 2)), np.array([[0.0, 1.0]]), dZ)
    assert loss == pytest.approx(2 * np.log(2), rel=1e-15)
    np.testing.assert_array_equal(dZ, [[0.5, -0.5]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_give_finite_loss_and_gradient(dtype):
    Z = np.array([[-1e4, -50.0, 0.0, 50.0, 1e4]], dtype=dtype)
    Y = np.array([[1.0, 0.0, 1.0, 1.0, 0.0]], dtype=dtype)
    dZ = np.empty_like(Z)
    loss = OUTPUTS["binary"].loss_and_delta(Z, Y, dZ)
    assert np.isfinite(loss) and np.all(np.isfinite(dZ))
    assert loss == pytest.approx(1e4 + np.log1p(np.exp(-50.0)) + np.log(2) + 1e4, rel=1e-6)
    np.testing.assert_allclose(dZ, [[-1, 0, -0.5, 0, 1]], atol=1e-7)

    Zm = np.array([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]], dtype=dtype)
    Ym = np.eye(3, dtype=dtype)[:, [1, 1]]
    dZm = np.empty_like(Zm)
    loss = OUTPUTS["multiclass"].loss_and_delta(Zm, Ym, dZm)
    assert loss == pytest.approx(2e4, rel=1e-6)
    assert np.all(np.isfinite(dZm))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_sigmoid_network_stays_finite(dtype):
    arch = Architecture((3, 4, 1), "sigmoid", "binary")
    theta = (init_params(arch.layout, "normal", 0, np.float64) * 1e6).astype(dtype)
    X = np.array([[1e3, -1e3], [5.0, -5.0], [0.0, 1.0]], dtype=dtype)
    Y = np.array([[0.0, 1.0]], dtype=dtype)
    sums = Network(arch, dtype, threads=1).gradient(theta, Batch(X, Y, dtype))
    assert np.isfinite(sums.loss) and np.all(np.isfinite(sums.grad))


@pytest.mark.parametrize("task,n_out", [("binary", 1), ("multiclass", 4), ("regression", 2)])
def test_predict_uses_the_same_forward_pass(task, n_out):
    rng = np.random.default_rng(0)
    arch = Architecture((3, 5, n_out), "relu", task)
    theta = init_params(arch.layout, "he", 1, np.float64)
    X = rng.standard_normal((3, 11))
    A = Network(arch, threads=1).predict(theta, X)
    W1, W2 = arch.layout.weights(theta)
    b1, b2 = arch.layout.biases(theta)
    Z = W2 @ np.maximum(W1 @ X + b1[:, None], 0) + b2[:, None]
    expected = {
        "binary": 1 / (1 + np.exp(-Z)),
        "multiclass": np.exp(Z) / np.exp(Z).sum(axis=0),
        "regression": Z,
    }[task]
    np.testing.assert_allclose(A, expected, rtol=1e-12)


def test_l2_penalty_touches_weights_only():
    layout = Layout((2, 3, 1))
    theta = np.arange(layout.size, dtype=float)
    loss, grad = l2_penalty(theta, layout.weight_mask, 0.5)
    weights = np.concatenate([W.ravel() for W in layout.weights(theta)])
    assert loss == pytest.approx(0.25 * np.dot(weights, weights))
    assert all(np.all(b == 0) for b in layout.biases(grad))
    np.testing.assert_array_equal(
        np.concatenate([W.ravel() for W in layout.weights(grad)]), 0.5 * weights
    )
