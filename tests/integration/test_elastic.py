"""An elastic run on a local Ray runtime with room for more workers grows to
cluster.max_workers at a step boundary, says so, and ends with the bits of the in-process
run (train.reduction: exact). Shrinking needs a lost node: tests/cluster/test_elastic.py."""

import numpy as np
import pytest
from mlflow import MlflowClient

from shardprop.service.cluster import group
from shardprop.service.config import load_config
from shardprop.service.training.run import train

pytestmark = pytest.mark.slow

SETS = [
    "data.synthetic={name: moons, rows: 1001, noise: 0.3, seed: 2}",
    "model.hidden=[16, 8]",
    "train.steps=30",
    "train.optimizer=adam",
    "train.learning_rate=0.01",
    "train.reduction=exact",
]


def test_a_run_with_room_grows_to_max_workers_and_keeps_the_bits(
    ray_session, tmp_path, monkeypatch
):
    monkeypatch.setattr(group, "GROW_CHECK_SECONDS", 0.0)  # look for room at every boundary
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flags = {"cluster.workers": 1, "tracking.uri": uri}
    grown = train(load_config(None, [*SETS, "cluster.max_workers=3"], flags))
    reference = train(load_config(None, SETS, {"cluster.workers": 0, "tracking.enabled": False}))
    assert np.array_equal(grown.theta.view(np.uint8), reference.theta.view(np.uint8))

    client = MlflowClient(uri)
    run = client.get_run(grown.run_id)
    workers = [m.value for m in client.get_metric_history(grown.run_id, "workers")]
    assert workers == [3.0] * 30, workers  # grown before the first step's gradient
    assert run.data.tags["shardprop.resizes"] == "step 1: 1 -> 3 workers: room for 2 more worker(s)"


def test_a_fixed_size_run_logs_no_worker_count(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(load_config(None, SETS, {"cluster.workers": 2, "tracking.uri": uri}))
    client = MlflowClient(uri)
    assert client.get_metric_history(result.run_id, "workers") == []
    assert "shardprop.resizes" not in client.get_run(result.run_id).data.tags
