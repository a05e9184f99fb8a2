"""Lost workers: the run goes on to the same weights, bit for bit, or fails cleanly.

Real processes: the chaos option SIGKILLs a Ray worker's process, as `kill -9` would.
"""

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.cluster.policy import Decision, FailurePolicy
from shardprop.service.config import load_config
from shardprop.service.training.run import train
from shardprop.workers.chaos import InjectedFailure
from shardprop.workers.network.params import load_weights

pytestmark = pytest.mark.slow

SETS = [
    "data.synthetic={name: moons, rows: 1001, noise: 0.3, seed: 2}",
    "model.hidden=[16, 8]",
    "train.steps=50",
    "train.optimizer=adam",
    "train.learning_rate=0.01",
    "train.checkpoint_every=10",
]


def run(uri, workers=2, chaos=None, *sets):
    flags = {"cluster.workers": workers, "tracking.uri": uri, "cluster.inject_failure": chaos}
    return train(load_config(None, [*SETS, *sets], flags))


@pytest.fixture(scope="module")
def unfaulted(new_store, ray_session, tmp_path_factory):
    return run(new_store(tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("when", ["before", "after", "hang"])
def test_a_worker_lost_at_step_17_changes_nothing_in_the_result(
    ray_session, unfaulted, tracking_uri, when
):
    # hang: a worker that never answers is lost after cluster.step_timeout seconds
    faulted = run(tracking_uri, 2, f"worker=1,step=17,when={when}", "cluster.step_timeout=3")
    assert np.array_equal(faulted.theta, unfaulted.theta)  # bit for bit
    client = MlflowClient(tracking_uri)
    losses = client.get_metric_history(faulted.run_id, "loss")
    assert sorted(point.step for point in losses) == list(range(1, 51))
    assert [p.value for p in sorted(losses, key=lambda p: p.step)] == unfaulted.history["loss"]
    (restarts,) = client.get_metric_history(faulted.run_id, "worker_restarts")
    assert (restarts.step, restarts.value) == (17, 1)


def test_more_failures_than_allowed_fail_the_run_and_keep_a_loadable_checkpoint(
    new_store, ray_session, tmp_path
):
    uri = new_store(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "/dev/null",
            *(arg for s in SETS for arg in ("--set", s)),
            "--set",
            "cluster.max_worker_failures=2",
            "--workers",
            "2",
            "--inject-failure",
            "worker=0,step=23,times=3",
            "--tracking-uri",
            uri,
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1, result.output
    (message,) = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert "worker 0 (rows 0..512) was lost" in message  # 4 of the 8 blocks of 128 rows
    assert "cluster.max_worker_failures=2" in message
    kept = message.split("the last good weights: ")[1].split(";")[0]
    assert kept.endswith("step-000020/weights.npz")
    assert "go on with: shardprop resume " in message
    load_weights(kept)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("shardprop").experiment_id])[0]
    assert run.info.status == "FAILED"


def test_failure_policy_replaces_until_the_budget_is_spent():
    policy = FailurePolicy(max_failures=2)
    assert policy.on_lost(1, "died") is Decision.REPLACE
    assert policy.on_lost(0, "hung") is Decision.REPLACE
    assert policy.on_lost(1, "died") is Decision.RAISE
    assert policy.restarts == 2
    assert FailurePolicy(0).on_lost(0, "died") is Decision.RAISE


@pytest.mark.parametrize(
    "text, expected",
    [
        ("worker=1,step=17", InjectedFailure(1, 17, 1, "before")),
        ("worker=0, step=3, times=2, when=after", InjectedFailure(0, 3, 2, "after")),
    ],
)
def test_inject_failure_option_parses(text, expected):
    assert InjectedFailure.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["worker=1", "step=2", "worker=x,step=1", "worker=0,step=0", "worker=0,step=1,at=3"]
)
def test_bad_inject_failure_options_are_refused(text):
    with pytest.raises(ValueError):
        InjectedFailure.parse(text)
