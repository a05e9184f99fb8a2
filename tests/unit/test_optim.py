"""Optimizers update the flat vector exactly as their textbook rules say."""

import numpy as np
import pytest

from shardprop.service.config import TrainConfig
from shardprop.service.training.optim import make_optimizer
from shardprop.service.training.reduce import batch_mean, reduce_sums
from shardprop.workers.reduction.sums import ShardSums


def test_gradient_descent_step():
    theta = np.array([1.0, -2.0])
    make_optimizer(TrainConfig(), 2, theta.dtype).step(theta, np.array([2.0, 2.0]), 0.5)
    np.testing.assert_array_equal(theta, [0.0, -3.0])


def test_momentum_accumulates_velocity():
    theta = np.zeros(1)
    opt = make_optimizer(TrainConfig(optimizer="momentum", momentum=0.5), 1, theta.dtype)
    for _ in range(3):
        opt.step(theta, np.ones(1), 1.0)
    # v = 1, 1.5, 1.75
    assert theta[0] == pytest.approx(-(1 + 1.5 + 1.75))


def test_adam_first_step_moves_by_learning_rate_and_state_round_trips():
    theta = np.zeros(3)
    config = TrainConfig(optimizer="adam")
    opt = make_optimizer(config, 3, theta.dtype)
    grad = np.array([3.0, -0.5, 1e-3])
    opt.step(theta, grad, 0.1)
    np.testing.assert_allclose(theta, -0.1 * np.sign(grad), rtol=1e-4)
    copy = make_optimizer(config, 3, theta.dtype)
    copy.load_state(opt.state())
    a, b = theta.copy(), theta.copy()
    opt.step(a, grad, 0.1)
    copy.step(b, grad, 0.1)
    assert np.array_equal(a, b)


def test_reduce_divides_summed_gradients_by_total_rows():
    parts = [
        ShardSums(np.array([3.0, 6.0]), 3.0, 3, 2),
        ShardSums(np.array([0.0, 0.0]), 0.0, 0, 0),
        ShardSums(np.array([1.0, 2.0]), 5.0, 1, 1),
    ]
    mean = batch_mean(reduce_sums(parts))
    np.testing.assert_array_equal(mean.grad, [1.0, 2.0])
    assert (mean.loss, mean.rows, mean.accuracy) == (2.0, 4, 0.75)
    assert parts[0].grad[0] == 3.0  # the reduce does not write into a worker's result
