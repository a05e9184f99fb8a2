"""A real multi-node cluster on loopback: `ray start` processes (a head and a second node),
a real `mlflow server` with served artifacts, and the `shardprop` CLI as a user runs it.

Each node offers one `shard_slot` and each worker asks for one, so two shards must land on
two nodes. The same topology as docker-compose.yml, without Docker.
"""

import json
import os
import re
import secrets
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from shardprop.service.data.plan import write_table
from shardprop.service.sweep.run import ROWS_TAG
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from tests.processes import BIN, MlflowServer, RayCluster

CONFIG = """\
data: {synthetic: {name: moons, rows: 2001, seed: 3}}
model: {hidden: [8, 8]}
train: {steps: 15, checkpoint_every: 5}
cluster: {workers: 2, worker_resources: {shard_slot: 1}}
"""


def client_env(**changes: str | None) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def shardprop(*args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "shardprop"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def token_cluster():
    token = secrets.token_hex(32)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    with RayCluster.running(env, resources={"shard_slot": 1}) as cluster:
        cluster.token = token
        yield cluster


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CONFIG)
    return path


def finished_run(server: MlflowServer, stdout: str):
    run_id = next(
        line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith("run ")
    )
    return MlflowClient(server.uri).get_run(run_id)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found.add(item.path)
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
    return found


class TestTwoNodesAndATrackingServer:
    def test_a_run_spreads_its_shards_over_both_nodes_and_uploads_through_the_server(
        self, cluster, mlflow_server, config, tmp_path
    ):
        result = shardprop(
            "train",
            config,
            "--address",
            cluster.address,
            "--tracking-uri",
            mlflow_server.uri,
            "--output",
            tmp_path / "out",
            cwd=tmp_path,
            env=client_env(RAY_AUTH_MODE="disabled"),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        run = finished_run(mlflow_server, result.stdout)
        assert run.info.status == "FINISHED"
        # artifacts went through the server, into its own artifact folder
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        client = MlflowClient(mlflow_server.uri)
        paths = artifact_paths(client, run.info.run_id)
        assert {"weights/final.npz", "shards.json", "config.yaml"} <= paths
        assert any(p.startswith("checkpoints/step-000015") for p in paths)
        stored = mlflow_server.folder / "artifacts"
        assert list(stored.rglob("final.npz")) and list(stored.rglob("MLmodel"))
        # the model loads back through the server (MLflow 3 keeps it as a logged model)
        mlflow.set_tracking_uri(mlflow_server.uri)
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        frame = pd.DataFrame({"x0": [0.0, 1.0], "x1": [0.5, -0.5]})
        assert model.predict(frame).shape[0] == 2

        shards_file = Path(client.download_artifacts(run.info.run_id, "shards.json", tmp_path))
        shards = json.loads(shards_file.read_text())["shards"]
        assert [s["rank"] for s in shards] == [0, 1]
        assert len({s["node_id"] for s in shards}) == 2  # one shard on each node
        assert [s["rows"] for s in shards] == [[0, 1024], [1024, 2001]]  # 4 + 4 blocks of 256
        # joining a cluster ships this version of workers/ with the job (runtime_env)
        assert all("_ray_pkg_" in s["code"] for s in shards), shards

    def test_shards_no_node_can_hold_are_refused_before_any_row_is_read(self, cluster, tmp_path):
        """The plan against the memory each node reports to Ray: one line naming the worker,
        its rows, the node and the figures, and what to change; no worker is started."""
        config = tmp_path / "huge.yaml"
        config.write_text(
            CONFIG.replace("moons, rows: 2001", "blobs, rows: 400_000_000, features: 64")
        )
        result = shardprop(
            "train",
            config,
            "--address",
            cluster.address,
            "--no-tracking",
            cwd=tmp_path,
            env=client_env(RAY_AUTH_MODE="disabled"),
            timeout=120,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert re.search(r"memory: worker \d \(rows [\d,]+\.\.[\d,]+\) needs", line), line
        assert re.search(r"the largest node, [\d.]+ \([0-9a-f]{8}\), has [\d.]+ GiB", line), line
        assert "cluster.workers" in line or "machines" in line, line
        assert "Traceback" not in result.stderr
        assert "loading" not in result.stdout.lower()

    def test_the_cluster_run_gives_the_in_process_weights(self, cluster, config, tmp_path):
        """Equivalence across machines: two nodes reached through Ray Client (ray://)."""
        env = client_env(RAY_AUTH_MODE="disabled")
        remote = shardprop(
            "train",
            config,
            "--address",
            cluster.client_address,
            "--no-tracking",
            "--output",
            tmp_path / "remote",
            cwd=tmp_path,
            env=env,
        )
        assert remote.returncode == 0, remote.stderr[-3000:]
        local = shardprop(
            "train",
            config,
            "--workers",
            "0",
            "--no-tracking",
            "--output",
            tmp_path / "local",
            cwd=tmp_path,
            env=env,
        )
        assert local.returncode == 0, local.stderr[-3000:]
        with (
            np.load(tmp_path / "remote" / "weights.npz") as a,
            np.load(tmp_path / "local" / "weights.npz") as b,
        ):
            assert a.files == b.files
            for name in a.files:
                np.testing.assert_allclose(a[name], b[name], rtol=1e-10, atol=1e-12)

    def test_submit_runs_the_training_as_a_ray_job_tracked_on_the_server(
        self, cluster, mlflow_server, config, tmp_path
    ):
        result = shardprop(
            "submit",
            config,
            "--address",
            cluster.jobs_address,
            "--tracking-uri",
            mlflow_server.uri,
            "--run-name",
            "submitted",
            cwd=tmp_path,
            env=client_env(RAY_AUTH_MODE="disabled"),
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "SUCCEEDED" in result.stdout
        assert "step 15/15" in result.stdout  # the job's logs are streamed
        run = finished_run(mlflow_server, result.stdout)
        assert run.info.status == "FINISHED" and run.info.run_name == "submitted"

    def test_a_sweep_runs_its_trials_on_the_cluster_nested_on_the_server(
        self, cluster, mlflow_server, config, tmp_path
    ):
        """Two trials, each a coordinator and a worker of their own (2 CPUs: the whole
        cluster), one after the other, on a Parquet file's rows that the sweep read once
        into the cluster's object store; nested under the sweep's run on the tracking
        server; a trial's weights are the in-process run's of its config (exact)."""
        env = client_env(RAY_AUTH_MODE="disabled")
        rows = generate(SyntheticSpec("moons", 2001, seed=3), 0, 2001)
        write_table(rows, tmp_path / "moons.parquet", row_group_rows=500)
        data = ["--set", "data.synthetic=null", "--set", "data.path=moons.parquet"]
        result = shardprop(
            "sweep", config, *data, "--param", "train.learning_rate=0.1,0.2", "--workers", "1",
            "--address", cluster.address, "--tracking-uri", mlflow_server.uri,
            "--experiment", "sweep-on-a-cluster", cwd=tmp_path, env=env,
        )  # fmt: skip
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "2 trials in" in result.stdout
        client = MlflowClient(mlflow_server.uri)
        experiment = client.get_experiment_by_name("sweep-on-a-cluster").experiment_id
        runs = client.search_runs([experiment])
        (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
        trials = [run for run in runs if run is not parent]
        assert len(trials) == 2
        assert parent.data.tags[ROWS_TAG].startswith("read once into Ray's object store")
        for trial in trials:
            assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert trial.info.status == "FINISHED"
        (slow,) = [t for t in trials if t.data.params["train.learning_rate"] == "0.1"]
        local = shardprop(
            "train", config, *data, "--workers", "0", "--no-tracking",
            "--output", tmp_path / "local", "--set", "train.learning_rate=0.1", cwd=tmp_path,
            env=env,
        )  # fmt: skip
        assert local.returncode == 0, local.stderr[-3000:]
        weights = tmp_path / ".shardprop" / "runs" / slow.info.run_id / "weights.npz"
        with np.load(weights) as got, np.load(tmp_path / "local" / "weights.npz") as want:
            for name in want.files:
                assert np.array_equal(got[name], want[name]), name


class TestTokenAuthentication:
    def test_a_client_with_the_token_trains(self, token_cluster, config, tmp_path):
        env = client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token_cluster.token)
        result = shardprop(
            "train",
            config,
            "--address",
            token_cluster.address,
            "--no-tracking",
            "--output",
            tmp_path / "out",
            cwd=tmp_path,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / "out" / "weights.npz").exists()

    def test_a_client_without_it_is_refused_with_one_clear_line(
        self, token_cluster, config, tmp_path
    ):
        # no token anywhere: not in the environment, not in ~/.ray/auth_token
        env = client_env(RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=None)
        env["HOME"] = str(tmp_path)
        result = shardprop(
            "train",
            config,
            "--address",
            token_cluster.address,
            "--no-tracking",
            cwd=tmp_path,
            env=env,
            timeout=180,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        assert "requires token authentication" in result.stderr
        assert "Traceback" not in result.stderr

    def test_submit_with_the_token_file_runs_the_job(self, token_cluster, config, tmp_path):
        token_file = tmp_path / "ray_token"
        token_file.write_text(token_cluster.token + "\n")  # as the README's one-liner writes it
        env = client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=None)
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
        result = shardprop(
            "submit",
            config,
            "--address",
            token_cluster.jobs_address,
            "--no-wait",
            "--set",
            "tracking.enabled=false",
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        job_id = result.stdout.split()[2]
        status = subprocess.run(
            [str(BIN / "ray"), "job", "status", job_id, "--address", token_cluster.jobs_address],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0 and job_id in status.stdout + status.stderr

    def test_the_jobs_api_refuses_a_client_without_the_token(self, token_cluster, config, tmp_path):
        env = client_env(RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=None)
        env["HOME"] = str(tmp_path)
        result = shardprop(
            "submit",
            config,
            "--address",
            token_cluster.jobs_address,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
        assert "requires token authentication" in result.stderr
