"""A run that fails mid-way says so in one line, exits 1, and keeps its last good weights."""

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.cluster.group import RayGroup
from shardprop.service.config import load_config
from shardprop.service.errors import TrainingError
from shardprop.service.training.run import make_plan
from shardprop.workers.network.params import load_weights
from tests.groups import kill_and_wait


def test_divergence_fails_the_run_and_keeps_the_last_finite_checkpoint(new_store, tmp_path):
    uri = new_store(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "/dev/null",
            "--set",
            "data.synthetic={name: regression, rows: 500}",
            "--set",
            "train.learning_rate=50",
            "--set",
            "train.steps=200",
            "--set",
            "train.checkpoint_every=1",
            "--workers",
            "0",
            "--tracking-uri",
            uri,
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert "diverged at step" in message and "learning_rate" in message
    assert "--init-weights" in message  # a resume would diverge again: a new start from them
    kept = message.split("the last good weights: ")[1].split()[0]
    _, theta = load_weights(kept)  # refuses non-finite values: so these are finite
    assert np.all(np.isfinite(theta))
    run = MlflowClient(uri).search_runs(MlflowClient(uri).search_experiments()[0].experiment_id)[0]
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["error"]
    step = int(message.split("diverged at step ")[1].split()[0])
    assert run.data.tags["shardprop.diverged_at_step"] == str(step)
    assert kept.endswith(f"step-{step - 1:06d}/weights.npz")  # the last finite weights


def test_a_lost_worker_is_named(ray_session):
    config = load_config(None, ["data.synthetic.rows=300"], {"cluster.workers": 2})
    plan = make_plan(config)
    group = RayGroup(plan, cpus_per_worker=1, owns_runtime=False)
    try:
        group.call("load")
        kill_and_wait(ray_session, group.actors[1])
        with pytest.raises(TrainingError, match=r"worker 1 \(rows 152\.\.300\) was lost"):
            group.call("load")
    finally:
        group.close()
