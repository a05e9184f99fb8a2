"""A node lost with no room left for its worker: the run does not wait for ever. It fails
after cluster.start_timeout, names what could not be placed, keeps its last checkpoint and
says how to go on; the resume on a cluster with room again ends with the undisturbed bits."""

import time
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from tests.processes import RayCluster, stop_group, wait_for_checkpoint
from tests.processes import start_shardprop as shardprop

CONFIG = """\
data: {synthetic: {name: moons, rows: 4001, seed: 3}}
model: {hidden: [32, 32]}
train: {steps: 400, optimizer: adam, learning_rate: 0.01, checkpoint_every: 10}
cluster: {workers: 2, worker_resources: {shard_slot: 1}, start_timeout: 15, transport: plain}
tracking: {flush_seconds: 0.2}
"""
ONE_NODE = CONFIG.replace(
    "worker_resources: {shard_slot: 1}, start_timeout: 15", "start_timeout: 120"
)


def test_a_worker_whose_node_is_gone_fails_the_run_after_start_timeout(tmp_path, cluster):
    # plain calls: after a compiled graph lost a node's actor, Ray itself sometimes crashes
    # the driver at exit (SIGSEGV, after the run's last line): the exit code is Ray's then
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the schema, before this test polls the store
    out = tmp_path / "out"
    run = shardprop(
        "train", config, "--address", cluster.address, "--tracking-uri", uri, "--output", out,
        cwd=tmp_path,
    )  # fmt: skip
    wait_for_checkpoint(run, out, 20)
    stop_group(cluster.nodes[1])  # the second node, and its shard_slot, are gone for good
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
    reference = shardprop(
        "train", config, "--no-tracking", "--workers", "0", "--output", tmp_path / "ref",
        cwd=tmp_path,
    )  # fmt: skip
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr
    with np.load(out / "weights.npz") as got, np.load(tmp_path / "ref" / "weights.npz") as want:
        for name in want.files:
            assert np.array_equal(got[name], want[name]), name


def test_the_only_node_lost_fails_the_run_at_once_and_says_how_to_go_on(tmp_path):
    """One node: losing it is losing the run. Ray ends the coordinator at once, without a
    word of ours; the run is marked FAILED and its last line names the last checkpoint and
    the resume command (the test above runs that command)."""
    cluster = RayCluster({"RAY_AUTH_MODE": "disabled"}, cpus_per_node=2)
    try:
        cluster.start(nodes=1)
        config = tmp_path / "run.yaml"
        config.write_text(ONE_NODE)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        MlflowClient(uri).search_experiments()  # the schema, before this test polls the store
        out = tmp_path / "out"
        run = shardprop(
            "train", config, "--address", cluster.address, "--tracking-uri", uri, "--output", out,
            cwd=tmp_path,
        )  # fmt: skip
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
    finally:
        cluster.stop()
