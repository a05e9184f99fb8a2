"""The metrics people read: tallies summed per chunk add up to the whole batch's, and the
metrics made from them are scikit-learn's."""

import datetime
import itertools
import json

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn import metrics as skl

from shardprop.service.tracking.plots import plot_confusion, save_confusion_json
from shardprop.service.training.metrics import confusion_matrix, roc_auc, task_metrics
from shardprop.service.training.reduce import batch_mean, reduce_sums
from shardprop.workers.network.backprop import Architecture, Batch, Network
from shardprop.workers.network.losses import OUTPUTS
from shardprop.workers.network.params import init_params
from shardprop.workers.reduction.blocktree import BlockGrid
from shardprop.workers.reduction.sums import ShardSums

WIDTH = {"binary": 1, "multiclass": 4, "regression": 1}


def problem(task: str, m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_out = WIDTH[task]
    arch = Architecture((3, 8, n_out), "tanh", task)
    theta = init_params(arch.layout, "xavier", seed, np.float64)
    theta += 0.3 * rng.standard_normal(theta.size)  # predictions of every class
    X = rng.standard_normal((3, m))
    if task == "binary":
        Y = (rng.random((1, m)) < 0.4).astype(float)
    elif task == "multiclass":
        Y = np.eye(n_out)[rng.integers(0, n_out, m)].T
    else:
        Y = rng.standard_normal((1, m))
    return arch, theta, Batch(X, Y)


def assert_same_tallies(task: str, got: np.ndarray, want: np.ndarray) -> None:
    if task == "regression":  # sums of floats, grouped otherwise
        np.testing.assert_allclose(got, want, rtol=1e-12)
    else:  # counts: exact in any grouping
        assert np.array_equal(got, want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("task", sorted(OUTPUTS))
def test_tallies_of_chunks_and_threads_add_up_to_the_whole_batchs(task, threads):
    m = 2 * 2048 + 37  # two parts of 2048 columns and more, in chunks of 300 and a rest
    arch, theta, batch = problem(task, m)
    whole, chunked = Network(arch, threads=1), Network(arch, threads=threads)
    whole.chunk, chunked.chunk = m, 300
    one = whole.gradient(theta, batch)
    # the whole batch in one chunk: the output's tallies of the whole Z
    A = whole.predict(theta, batch.X)
    if task == "binary":
        cells = 2 * (batch.Y[0] > 0.5) + (A[0] > 0.5)
        assert np.array_equal(one.tallies, np.bincount(cells, minlength=4))
    elif task == "multiclass":
        want = skl.confusion_matrix(batch.Y.argmax(0), A.argmax(0), labels=range(4))
        assert np.array_equal(one.tallies, want.ravel())
    else:
        error = A - batch.Y
        want = [np.abs(error).sum(), (error**2).sum(), batch.Y.sum(), (batch.Y**2).sum()]
        np.testing.assert_allclose(one.tallies, want, rtol=1e-12)
    for sums in (chunked.gradient(theta, batch), chunked.evaluate(theta, batch)):
        assert chunked.buffers[0].width == 300  # it did run in chunks
        assert sums.tallies.dtype == np.float64 and sums.tallies.shape == one.tallies.shape
        assert_same_tallies(task, sums.tallies, one.tallies)
    if task != "regression":
        assert one.tallies.sum() == m
        if task == "binary":
            hits = (A > 0.5) == (batch.Y > 0.5)
        else:
            hits = A.argmax(0) == batch.Y.argmax(0)
        assert one.correct == np.count_nonzero(hits)


@pytest.mark.parametrize("task", sorted(OUTPUTS))
def test_block_gradient_tallies_equal_the_plain_gradients(task):
    m = 1001
    arch, theta, batch = problem(task, m, seed=1)
    grid = BlockGrid(m, 143)
    network = Network(arch, threads=2)
    plain = network.gradient(theta, batch)
    for blocked in (
        network.block_gradient(theta, batch, grid.bounds(0, m), 0, grid).total(),
        network.block_evaluate(theta, batch, grid.bounds(0, m), 0, grid).total(),
    ):
        assert_same_tallies(task, blocked.tallies, plain.tallies)


@pytest.mark.parametrize("task", sorted(OUTPUTS))
def test_exact_reduction_gives_the_same_tally_bits_for_any_worker_count(task):
    m = 1001
    arch, theta, batch = problem(task, m, seed=2)
    grid = BlockGrid(m, 64)

    def reduced(workers: int) -> ShardSums:
        parts = []
        for start, stop in grid.split(workers):
            shard = Batch(batch.X[:, start:stop], batch.Y[:, start:stop])
            bounds, first = grid.bounds(start, stop), start // grid.block_rows
            network = Network(arch, threads=2)
            parts.append(network.block_gradient(theta, shard, bounds, first, grid))
        return reduce_sums(parts)

    reference = reduced(1).tallies
    for workers in (2, 3, 5):
        assert np.array_equal(reduced(workers).tallies, reference), f"{workers} workers"


def test_a_worker_without_rows_adds_no_tallies():
    arch, theta, batch = problem("binary", 50)
    sums = Network(arch, threads=1).evaluate(theta, batch)
    empty = ShardSums(np.empty(0), 0.0, 0, 0)
    assert empty.tallies is None
    for parts in ([empty, sums], [sums, empty], [empty, sums, empty]):
        total = reduce_sums(parts)
        assert np.array_equal(total.tallies, sums.tallies)
        assert np.array_equal(batch_mean(total).tallies, sums.tallies)  # sums, not divided
    assert reduce_sums([empty, empty]).tallies is None
    assert task_metrics("binary", None, 0) == {}


def chunked_tallies(task: str, Z: np.ndarray, Y: np.ndarray, cuts: list[int]) -> np.ndarray:
    """The tallies as workers give them: summed over uneven pieces of the rows."""
    output = OUTPUTS[task]
    return sum(output.tallies(Z[:, lo:hi], Y[:, lo:hi]) for lo, hi in itertools.pairwise(cuts))


CUTS = [0, 123, 124, 124, 480, 1000]


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_are_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    m = 1000
    y = (rng.random(m) < 0.3).astype(float)
    Z = rng.standard_normal((1, m)) + 0.8 * y - [0.5 * seed]  # more seeds, fewer positives
    tallies = chunked_tallies("binary", Z, y[None], CUTS)
    predicted = (Z[0] > 0).astype(int)
    got = task_metrics("binary", tallies, m, prefix="val_")
    want = {
        "val_precision": skl.precision_score(y, predicted, zero_division=0),
        "val_recall": skl.recall_score(y, predicted, zero_division=0),
        "val_f1": skl.f1_score(y, predicted, zero_division=0),
    }
    assert got == pytest.approx(want, rel=1e-12)
    np.testing.assert_array_equal(
        confusion_matrix(tallies, [0, 1]), skl.confusion_matrix(y, predicted)
    )


def test_binary_metrics_without_a_predicted_positive_are_zero_as_in_scikit_learn():
    y = np.array([[0.0, 1.0, 1.0, 0.0]])
    tallies = OUTPUTS["binary"].tallies(-np.ones((1, 4)), y)
    assert task_metrics("binary", tallies, 4) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert skl.precision_score(y[0], np.zeros(4), zero_division=0) == 0.0


@pytest.mark.parametrize("seen", [4, 2])
@pytest.mark.parametrize("seed", range(3))
def test_macro_f1_is_scikit_learns(seed, seen):
    """Of 5 classes, `seen` occur as true classes; 3 and 4 are never predicted. Class 4 is
    then never seen at all: left out of the average, as f1_score leaves out a label it
    does not find; with 2 seen, class 2 is predicted but never true."""
    rng = np.random.default_rng(seed)
    m, K = 1000, 5
    true = rng.integers(0, seen, m)
    Z = rng.standard_normal((K, m))
    Z[true, np.arange(m)] += 1.0
    Z[3:] -= 100.0  # neither 3 nor 4 is ever predicted
    Y = np.eye(K)[true].T
    tallies = chunked_tallies("multiclass", Z, Y, CUTS)
    predicted = Z.argmax(0)
    got = task_metrics("multiclass", tallies, m)
    want = skl.f1_score(true, predicted, average="macro", zero_division=0)
    assert got == {"f1": pytest.approx(want, rel=1e-12)}
    np.testing.assert_array_equal(
        confusion_matrix(tallies, range(K)), skl.confusion_matrix(true, predicted, labels=range(K))
    )


@pytest.mark.parametrize("seed", range(3))
def test_regression_metrics_in_original_units_are_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    m = 1000
    y = 3000.0 + 450.0 * rng.standard_normal(m)  # targets in the thousands
    mean, std = y.mean(), y.std()
    y_std = (y - mean) / std  # what the network trains on
    Z = y_std + 0.3 * rng.standard_normal(m) + 0.1  # its predictions, standardised
    tallies = chunked_tallies("regression", Z[None], y_std[None], CUTS)
    predicted = Z * std + mean
    got = task_metrics("regression", tallies, m, target_std=std, prefix="val_")
    want = {
        "val_rmse": skl.root_mean_squared_error(y, predicted),
        "val_mae": skl.mean_absolute_error(y, predicted),
        "val_r2": skl.r2_score(y, predicted),
    }
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("value", [0.0, 0.1, 1 / 3, -7.25, 1e3])
def test_r2_of_a_constant_target_is_scikit_learns(value):
    """SST = 0: r2_score gives 1.0 for exact predictions and 0.0 otherwise. From sums SST
    comes out as rounding noise, and so does r2_score's own where the mean of the constant
    is not exact (0.1, 1/3): the noise counts as 0 here."""
    m = 997
    y = np.full((1, m), value)
    for Z, want in ((y.copy(), 1.0), (y + 0.01, 0.0)):
        tallies = chunked_tallies("regression", Z, y, [0, 100, 101, 600, m])
        assert task_metrics("regression", tallies, m)["r2"] == want
        if y[0].mean() == value:  # scikit-learn's SST exactly 0
            assert skl.r2_score(y[0], Z[0]) == want


@pytest.mark.parametrize("seed", range(3))
def test_roc_auc_is_scikit_learns_with_ties_too(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(500) < 0.35).astype(float)
    scores = 1 / (1 + np.exp(-(rng.standard_normal(500) + labels)))
    assert roc_auc(scores, labels) == pytest.approx(skl.roc_auc_score(labels, scores), rel=1e-12)
    tied = np.round(scores, 1)
    assert roc_auc(tied, labels) == pytest.approx(skl.roc_auc_score(labels, tied), rel=1e-12)
    # workers' pieces joined in rank order: the same array for any split
    pieces = np.split(scores, [100, 101, 333])
    assert roc_auc(np.concatenate(pieces), labels) == roc_auc(scores, labels)


def test_roc_auc_of_one_class_is_nan():
    assert np.isnan(roc_auc(np.array([0.2, 0.9]), np.array([1.0, 1.0])))
    assert np.isnan(roc_auc(np.empty(0), np.empty(0)))


def test_confusion_matrix_refuses_tallies_of_another_size():
    with pytest.raises(ValueError, match="3 classes"):
        confusion_matrix(np.zeros(4), ["a", "b", "c"])


def test_confusion_png_and_json_are_written_and_read_back(tmp_path):
    matrix = np.array([[50, 3, 0], [4, 40, 6], [0, 1, 30]])
    classes = [np.int64(2), "b", datetime.date(2024, 1, 2)]
    png = plot_confusion(matrix, classes, tmp_path / "plots" / "confusion.png")
    image = imread(png)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    assert image.std() > 0  # something drawn
    path = save_confusion_json(matrix, classes, tmp_path / "confusion.json")
    document = json.loads(path.read_text())
    assert document == {
        "classes": [2, "b", "2024-01-02"],
        "matrix": matrix.tolist(),
        "rows": "true",
        "columns": "predicted",
    }
    binary = save_confusion_json(np.array([[5, 1], [2, 7]]), [False, True], tmp_path / "b.json")
    assert json.loads(binary.read_text())["classes"] == [False, True]
