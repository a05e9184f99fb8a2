"""The network's gradient is the true gradient, and shard sums add up to the full batch."""

import itertools

import numpy as np
import pytest

from shardprop.workers.network.activations import ACTIVATIONS
from shardprop.workers.network.backprop import Architecture, Batch, Network
from shardprop.workers.network.losses import OUTPUTS
from shardprop.workers.network.params import init_params


def targets(task: str, n_out: int, m: int, rng: np.random.Generator) -> np.ndarray:
    if task == "binary":
        return (rng.random((1, m)) < 0.5).astype(float)
    if task == "multiclass":
        return np.eye(n_out)[rng.integers(0, n_out, m)].T
    return rng.standard_normal((n_out, m))


def problem(task: str, activation: str, hidden: tuple[int, ...], m: int = 9, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_out = {"binary": 1, "multiclass": 3, "regression": 2}[task]
    arch = Architecture((4, *hidden, n_out), activation, task)
    # random biases too, so no unit sits exactly at relu's kink
    theta = init_params(arch.layout, "xavier", seed, np.float64)
    theta += 0.1 * rng.standard_normal(theta.size)
    X = rng.standard_normal((4, m))
    return arch, theta, X, targets(task, n_out, m, rng)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("task", sorted(OUTPUTS))
def test_gradient_matches_central_finite_differences(task, activation, depth):
    arch, theta, X, Y = problem(task, activation, (5, 4, 6, 3)[:depth])
    net = Network(arch, threads=1)
    batch = Batch(X, Y)
    analytic = net.gradient(theta, batch).grad
    h = 1e-6
    numeric = np.empty_like(theta)
    for i in range(theta.size):
        step = np.zeros_like(theta)
        step[i] = h
        numeric[i] = (
            net.evaluate(theta + step, batch).loss - net.evaluate(theta - step, batch).loss
        ) / (2 * h)
    relative = np.linalg.norm(analytic - numeric) / np.linalg.norm(analytic + numeric)
    assert relative <= 1e-6


@pytest.mark.parametrize("task", sorted(OUTPUTS))
def test_uneven_shards_sum_to_full_batch_gradient(task):
    arch, theta, X, Y = problem(task, "tanh", (8, 5), m=40, seed=3)
    net = Network(arch, threads=1)
    full = net.gradient(theta, Batch(X, Y))
    cuts = [0, 17, 18, 18, 31, 40]  # shards of 17, 1, 0, 13 and 9 rows
    shards = [
        Network(arch, threads=1).gradient(theta, Batch(X[:, lo:hi], Y[:, lo:hi]))
        for lo, hi in itertools.pairwise(cuts)
    ]
    total_rows = sum(s.rows for s in shards)
    mean_grad = sum(s.grad for s in shards) / total_rows
    assert total_rows == 40
    np.testing.assert_allclose(mean_grad, full.grad / 40, rtol=1e-12, atol=1e-15)
    assert sum(s.loss for s in shards) / total_rows == pytest.approx(full.loss / 40, rel=1e-12)
    if task != "regression":
        assert sum(s.correct for s in shards) == full.correct


def test_shard_sums_are_sums_not_means():
    arch, theta, X, Y = problem("binary", "relu", (6,), m=10)
    net = Network(arch, threads=1)
    once = net.gradient(theta, Batch(X, Y))
    twice = net.gradient(theta, Batch(np.hstack([X, X]), np.hstack([Y, Y])))
    assert twice.rows == 2 * once.rows
    np.testing.assert_allclose(twice.grad, 2 * once.grad, rtol=1e-13)
    assert twice.loss == pytest.approx(2 * once.loss, rel=1e-13)


def test_buffers_are_reused_and_results_do_not_change_between_calls():
    arch, theta, X, Y = problem("multiclass", "relu", (7, 7), m=30)
    net = Network(arch, threads=2)
    batch = Batch(X, Y)
    first = net.gradient(theta, batch)
    buffers = [id(A1) for b in net.buffers for A1 in b.A1]
    second = net.gradient(theta, batch)
    net.evaluate(theta, batch)
    net.predict(theta, X)
    assert [id(A1) for b in net.buffers for A1 in b.A1] == buffers
    assert np.array_equal(first.grad, second.grad)
    assert first.grad is not second.grad


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("task", sorted(OUTPUTS))
def test_a_batch_run_in_chunks_gives_the_whole_batchs_sums(task, threads):
    """Uneven chunks too (the last one partial), in one thread and in several."""
    m = 3 * 2048 + 5  # three parts of 2048 columns and more
    arch, theta, X, Y = problem(task, "relu", (6, 5), m=m)
    whole, chunked = Network(arch, threads=1), Network(arch, threads=threads)
    whole.chunk, chunked.chunk = m, 300  # parts of 2048 or more: 300 columns, 6 times, and the rest
    batch = Batch(X, Y)
    one, many = whole.gradient(theta, batch), chunked.gradient(theta, batch)
    assert chunked.buffers[0].width == 300  # it did run in chunks
    np.testing.assert_allclose(many.grad, one.grad, rtol=1e-12, atol=1e-12)
    assert many.loss == pytest.approx(one.loss, rel=1e-12)
    assert (many.rows, many.correct) == (one.rows, one.correct)
    seen = chunked.evaluate(theta, batch)
    assert seen.loss == pytest.approx(one.loss, rel=1e-12) and seen.correct == one.correct
    np.testing.assert_allclose(chunked.predict(theta, X), whole.predict(theta, X), rtol=1e-12)


def test_a_worker_holds_a_chunk_of_activations_per_thread_not_its_shard():
    arch, theta, X, Y = problem("binary", "relu", (256, 256), m=20_000)
    net = Network(arch, np.float32, threads=2)
    assert net.chunk == 1024  # 1 MiB of the widest activation, in float32
    net.gradient(theta.astype(np.float32), Batch(X, Y, np.float32))
    assert [b.width for b in net.buffers] == [1024, 1024]


def test_threads_split_the_columns_and_their_sums_add_up_to_the_one_thread_gradient():
    from shardprop.workers.network.chunks import PART_MIN_ROWS

    m = 20_000
    assert m >= 3 * PART_MIN_ROWS  # big enough for three parts
    arch, theta, X, Y = problem("binary", "sigmoid", (64, 33), m=m)
    one = Network(arch, threads=1).gradient(theta, Batch(X, Y))
    three = Network(arch, threads=3)
    first = three.gradient(theta, Batch(X, Y))
    np.testing.assert_allclose(first.grad, one.grad, rtol=1e-12, atol=1e-12)
    assert first.loss == pytest.approx(one.loss, rel=1e-13)
    assert first.correct == one.correct
    assert np.array_equal(three.gradient(theta, Batch(X, Y)).grad, first.grad)  # repeatable


def test_float32_parameters_compute_in_float32_close_to_float64():
    arch, theta, X, Y = problem("binary", "relu", (16, 16), m=64)
    net64 = Network(arch, np.float64, threads=1)
    net32 = Network(arch, np.float32, threads=1)
    g64 = net64.gradient(theta, Batch(X, Y))
    g32 = net32.gradient(theta.astype(np.float32), Batch(X, Y, np.float32))
    assert g32.grad.dtype == np.float32
    np.testing.assert_allclose(g32.grad, g64.grad, rtol=1e-3, atol=1e-4)
    assert g32.loss == pytest.approx(g64.loss, rel=1e-5)


def test_wrong_dtype_or_size_of_parameters_is_refused():
    arch, theta, X, Y = problem("binary", "relu", (3,))
    net = Network(arch, threads=1)
    with pytest.raises(ValueError, match="flat float64 vector"):
        net.gradient(theta.astype(np.float32), Batch(X, Y))
    with pytest.raises(ValueError, match="flat float64 vector"):
        net.gradient(theta[:-1], Batch(X, Y))
