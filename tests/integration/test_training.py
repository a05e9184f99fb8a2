"""The heart: distributed training equals the in-process full-batch reference.

Real Ray actors (a local runtime), real Parquet files, a real MLflow store.
"""

import numpy as np
import pytest

from shardprop.service.config import load_config
from shardprop.service.data.plan import write_table
from shardprop.service.training.run import compute_fraction, train
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from shardprop.workers.network.params import init_params, save_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moons_1001(tmp_path_factory):
    """1,001 rows: split over 2 or 3 workers, the shards differ in size."""
    folder = tmp_path_factory.mktemp("data")
    table = generate(SyntheticSpec("moons", rows=1001, noise=0.3, seed=7), 0, 1001)
    return write_table(table, folder / "moons.parquet", row_group_rows=128)


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    """Given starting weights, so that every run starts from the same point."""
    from shardprop.workers.network.params import Layout

    layout = Layout((2, 16, 8, 1))
    theta = init_params(layout, "he", 123, np.float64)
    return save_weights(tmp_path_factory.mktemp("init") / "init.npz", layout, theta)


def run(data, weights, tracking_uri, workers, optimizer="gd", **sets):
    lr = {"gd": 0.5, "momentum": 0.1, "adam": 0.01}[optimizer]
    overrides = [
        f"data.path={data}",
        "model.hidden=[16, 8]",
        "model.activation=tanh",
        "train.steps=30",
        f"train.optimizer={optimizer}",
        f"train.learning_rate={lr}",
        "train.l2=0.001",
        "train.checkpoint_every=0",
        *(f"{key}={value}" for key, value in sets.items()),
    ]
    config = load_config(
        None, overrides, {"cluster.workers": workers, "tracking.uri": tracking_uri}
    )
    return train(config, init_weights=weights)


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "adam"])
def test_weights_after_30_steps_equal_the_in_process_reference_for_any_worker_count(
    ray_session, moons_1001, init_weights, tracking_uri, optimizer
):
    reference = run(moons_1001, init_weights, tracking_uri, 0, optimizer)
    assert not np.array_equal(reference.theta, np.load(init_weights)["W1"])  # it trained at all
    counts = [1, 2, 3] if optimizer == "gd" else [3]
    for workers in counts:
        distributed = run(moons_1001, init_weights, tracking_uri, workers, optimizer)
        scale = np.abs(reference.theta).max()
        deviation = np.abs(distributed.theta - reference.theta).max() / scale
        assert deviation <= 1e-10, f"{workers} workers deviate by {deviation:.2e}"
        assert distributed.final["loss"] == pytest.approx(reference.final["loss"], rel=1e-10)


def test_same_worker_count_gives_bitwise_identical_weights(
    ray_session, moons_1001, init_weights, tracking_uri
):
    first = run(moons_1001, init_weights, tracking_uri, 2, "adam")
    second = run(moons_1001, init_weights, tracking_uri, 2, "adam")
    assert np.array_equal(first.theta, second.theta)


def test_standardisation_uses_statistics_of_the_whole_training_set(
    ray_session, moons_1001, init_weights, tracking_uri
):
    import pyarrow.parquet as pq

    table = pq.read_table(moons_1001)
    X = np.column_stack([table["x0"].to_numpy(), table["x1"].to_numpy()])
    result = run(moons_1001, init_weights, tracking_uri, 3)
    np.testing.assert_allclose(result.setup.mean, X.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(result.setup.std, X.std(axis=0), rtol=1e-13)


def test_multiclass_string_labels_train_distributed(ray_session, tmp_path, tracking_uri):
    table = generate(SyntheticSpec("blobs", rows=600, noise=0.1, seed=2, classes=3), 0, 600)
    names = np.array(["cat", "dog", "eel"])[table["y"].to_numpy()]
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("y"), "y", pa.array(names))
    path = write_table(table, tmp_path / "blobs.parquet")
    config = load_config(
        None,
        [
            f"data.path={path}",
            "train.steps=60",
            "train.optimizer=adam",
            "train.learning_rate=0.05",
            "train.checkpoint_every=0",
        ],
        {"cluster.workers": 2, "tracking.uri": tracking_uri},
    )
    result = train(config)
    assert result.setup.task == "multiclass"
    assert result.setup.classes == ["cat", "dog", "eel"]
    assert result.final["accuracy"] > 0.9


def test_compute_fraction_sums_the_slowest_worker_of_each_step_over_this_process_steps():
    history = {
        "timing/step_seconds": [9.0, 1.0, 1.0],
        "worker_0/forward_seconds": [9.0, 0.25, 0.5],
        "worker_0/backward_seconds": [9.0, 0.5, 0.25],
        "worker_1/forward_seconds": [9.0, 0.5, 0.125],
        "worker_1/backward_seconds": [9.0, 0.5, 0.125],
    }
    # all three ran in this process; the first, which compiles the transport, is left out
    assert compute_fraction(history, 3, 12.0) == pytest.approx((1.0 + 0.75) / 3.0)
    # the first step was replayed from a checkpoint: the last two ran in this process
    assert compute_fraction(history, 2, 2.0) == pytest.approx(0.75 / 1.0)
    assert compute_fraction({"timing/step_seconds": []}, 0, 1.0) == 0.0


def test_a_steps_worker_timings_add_up_every_round_of_calls_it_made():
    """An lbfgs step calls the workers once per trial point: each worker's forward, backward
    and wait seconds are summed over the rounds, and so is what the transport added."""
    from shardprop.service.training.reduce import batch_mean, reduce_sums
    from shardprop.service.training.run import step_metrics
    from shardprop.workers.reduction.sums import ShardSums

    gradient = [
        ShardSums(np.ones(3), 1.0, 10, 5, seconds=0.3, forward_seconds=0.1),
        ShardSums(np.ones(3), 2.0, 20, 10, seconds=0.2, forward_seconds=0.05),
    ]
    forward_only = [
        ShardSums(np.ones(0), 1.0, 10, 5, seconds=0.1, forward_seconds=0.1),
        ShardSums(np.ones(0), 2.0, 20, 10, seconds=0.15, forward_seconds=0.15),
    ]
    mean = batch_mean(reduce_sums(gradient))
    rounds = [(gradient, 0.4), (forward_only, 0.2)]
    metrics = step_metrics(mean, mean.loss, mean.grad, rounds, (0.7, 0.01, 2))
    want = {
        "worker_0/forward_seconds": 0.2,
        "worker_0/backward_seconds": 0.2,
        "worker_0/wait_seconds": 0.1 + 0.1,
        "worker_1/forward_seconds": 0.2,
        "worker_1/backward_seconds": 0.15,
        "worker_1/wait_seconds": 0.2 + 0.05,
        "timing/allreduce_seconds": 0.1 + 0.05 + 0.01,
        "timing/straggler_ratio": 0.4 / 0.375,
        "timing/step_seconds": 0.7,
    }
    assert {name: metrics[name] for name in want} == pytest.approx(want)
