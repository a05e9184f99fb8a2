"""A node lost with no room left for its worker: the run does not wait for ever. It fails
after cluster.start_timeout, names what could not be placed, keeps its last checkpoint and
says how to go on; the resume on a cluster with room again ends with the undisturbed bits."""

import time
from pathlib import Path

from mlflow import MlflowClient

from tests.processes import (
    RayCluster,
    assert_in_process_bits,
    stop_group,
    train_on,
    wait_for_checkpoint,
)
from tests.processes import start_shardprop as shardprop

CONFIG = """\
data: {synthetic: {name: moons, rows: 4001, seed: 3}}
model: {hidden: [32, 32]}
train: {steps: 400, optimizer: adam, learning_rate: 0.01, checkpoint_every: 10}
cluster: {workers: 2, worker_resources: {shard_slot: 1}, start_timeout: 15, transport: plain}
tracking: {flush_seconds: 0.2}
"""
# steps enough that only the node's loss ends the run, however fast the machine
ONE_NODE = CONFIG.replace(
    "worker_resources: {shard_slot: 1}, start_timeout: 15", "start_timeout: 120"
).replace("steps: 400", "steps: 100000")


def test_a_worker_whose_node_is_gone_fails_the_run_after_start_timeout(tmp_path, cluster):
    # plain calls: after a compiled graph lost a node's actor, Ray itself sometimes crashes
    # the driver at exit (SIGSEGV, after the run's last line): the exit code is Ray's then
    run = train_on(cluster, CONFIG, tmp_path)
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out"
    wait_for_checkpoint(run, out, 20)
    stop_group(cluster.nodes[-1])  # the second node, and its shard_slot, are gone for good
    _, stderr = run.communicate(timeout=240)
    assert run.returncode == 1, stderr
    line = stderr.strip().splitlines()[-1]
    assert "the replacement of worker" in line and "could not be placed" in line, line
    assert "shard_slot 1" in line and "cluster.start_timeout" in line, line
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("shardprop").experiment_id])
    assert found.info.status == "FAILED"
    assert f"go on with: shardprop resume {found.info.run_id}" in line
    kept = Path(line.split("the last good weights: ")[1].split(";")[0])
    assert kept.parent.parent == out / "checkpoints" and kept.exists()

    # the second node back: the resume goes on to the bits of a run never disturbed
    cluster.add_node()
    resumed = shardprop(
        "resume", found.info.run_id, "--tracking-uri", uri, "--address", cluster.address,
        cwd=tmp_path,
    )  # fmt: skip
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert_in_process_bits(tmp_path / "run.yaml", out / "weights.npz", tmp_path)


def test_the_only_node_lost_fails_the_run_at_once_and_says_how_to_go_on(tmp_path):
    """One node: losing it is losing the run. Ray ends the coordinator at once, without a
    word of ours; the run is marked FAILED and its last line names the last checkpoint and
    the resume command (the test above runs that command)."""
    with RayCluster.running({"RAY_AUTH_MODE": "disabled"}, nodes=1, cpus_per_node=2) as cluster:
        run = train_on(cluster, ONE_NODE, tmp_path)
        uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out"
        wait_for_checkpoint(run, out, 20)
        stop_group(cluster.nodes[0])
        started = time.monotonic()
        _, stderr = run.communicate(timeout=120)
        assert time.monotonic() - started < 60, "waited for cluster.start_timeout (120 s)"
        assert run.returncode == 1, stderr
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("failed: the run ended without a word"), stderr
        client = MlflowClient(uri)
        (found,) = client.search_runs([client.get_experiment_by_name("shardprop").experiment_id])
        assert found.info.status == "FAILED"
        kept = Path(line.split("the last good weights: ")[1].split(";")[0])
        assert kept.parent.parent == out / "checkpoints" and kept.exists()
        command = line.split("go on with: ")[1]
        assert command == f"shardprop resume {found.info.run_id} --tracking-uri '{uri}'"
