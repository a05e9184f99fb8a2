"""Elastic groups on a local Ray runtime: a run with room for more workers grows to
cluster.max_workers at a step boundary, says so, and ends with the bits of the in-process
run (train.reduction: exact); a worker lost with no room for its replacement leaves the
group on the others, unless their memory cannot take its rows. A lost node, a killed
coordinator and a joining node: tests/cluster/test_elastic.py."""

import numpy as np
import pytest
from mlflow import MlflowClient

from shardprop.service.cluster import group
from shardprop.service.cluster.group import RayGroup
from shardprop.service.cluster.policy import FailurePolicy
from shardprop.service.config import load_config
from shardprop.service.data.estimate import estimate_plan
from shardprop.service.data.plan import DataPlan
from shardprop.service.errors import TrainingError
from shardprop.service.training.run import make_plan, train
from tests.groups import kill_and_wait

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


class Stranger:
    """Another job's actor, which takes the room a lost worker leaves."""

    def where(self) -> str:
        return "here"


def lose_worker_1_to_a_stranger(ray, estimate_for=None) -> tuple[RayGroup, object]:
    """Two elastic workers of 3 CPUs on the runtime's 6 (min 1); worker 1's process killed,
    and a stranger in its place before the group notices."""
    plan = make_plan(load_config(None, ["data.synthetic.rows=300"], {"cluster.workers": 2}))
    elastic = RayGroup(
        plan, cpus_per_worker=3, owns_runtime=False, policy=FailurePolicy(1), start_timeout=30,
        sizes=(1, 2), replace_timeout=2, estimate_for=estimate_for,
    )  # fmt: skip
    elastic.call("load", 0.0, 0)
    kill_and_wait(ray, elastic.actors[1])
    stranger = ray.remote(num_cpus=3)(Stranger).remote()
    ray.get(stranger.where.remote(), timeout=60)
    return elastic, stranger


def test_a_lost_worker_with_no_room_leaves_the_group_on_the_other(ray_session):
    elastic, stranger = lose_worker_1_to_a_stranger(ray_session)
    try:
        (record,) = elastic.call("where")  # the one left holds every row, loaded again
        assert record["rows"] == [0, 300]
        assert elastic.size == 1
        (change,) = elastic.changes
        assert change == (
            "2 -> 1 workers: worker 1 lost during where() (its process died), no room to replace it"
        )
    finally:
        elastic.close()
        ray_session.kill(stranger)


def test_a_shrink_the_others_memory_cannot_take_fails_the_run(ray_session):
    def big_table(plan: DataPlan):
        """The plan's costs as if each row were 1,000,000 rows of 64 features."""
        shards = [(start * 10**6, stop * 10**6) for start, stop in plan.shards]
        return estimate_plan(shards, 64, [256], 1, "float64", len(shards))

    elastic, stranger = lose_worker_1_to_a_stranger(ray_session, big_table)
    try:
        with pytest.raises(TrainingError) as failed:
            elastic.call("where")
        message = str(failed.value)
        assert message.startswith(
            "worker 1 lost during where() (its process died), no room to "
            "replace it; the other workers cannot take its rows: memory: "
            "worker 0 (rows 0..300,000,000) needs"
        ), message
        assert elastic.changes == []
    finally:
        elastic.close()
        ray_session.kill(stranger)
