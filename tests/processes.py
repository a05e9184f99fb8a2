"""Real servers for the tests, on loopback: an `mlflow server` and a multi-node Ray cluster
made of `ray start` processes. Each is torn down with its whole process group, also when a
test fails, and never touches another Ray runtime on the machine (no `ray stop`)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shardprop.service.bench.data import in_fresh_process  # noqa: F401 - the tests' too

BIN = Path(sys.executable).parent


def start_shardprop(*args: object, cwd: Path) -> subprocess.Popen:
    """The `shardprop` command as a user starts it, its output captured as text."""
    return subprocess.Popen(
        [str(BIN / "shardprop"), *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this process: the kernel may offer a
    just-closed port again, and Ray refuses two of its components on one port."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(ready: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {seconds} s")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def stop_group(process: subprocess.Popen, seconds: float = 10) -> None:
    """SIGTERM the process's whole group (a `ray start --block` takes its node down with
    it), SIGKILL what is left after `seconds`."""
    stop_groups([process], seconds)


def stop_groups(processes: list[subprocess.Popen], seconds: float = 10) -> None:
    """stop_group for several groups at once: all are told, then all are waited for."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            with contextlib.suppress(ProcessLookupError):  # the whole group has ended
                os.killpg(process.pid, sig)
        deadline = time.monotonic() + seconds
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        if sig == signal.SIGTERM:
            time.sleep(0.5)  # the group's other processes end a moment after their leader


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process's whole group at once, as a crash would end it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_for_checkpoint(run: subprocess.Popen, out: Path, step: int, seconds: float = 180) -> None:
    """Until `run` has written the checkpoint of `step` into `out`; it must still run."""
    deadline = time.monotonic() + seconds
    while not (out / "checkpoints" / f"step-{step:06d}" / "manifest.json").exists():
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, f"no checkpoint at step {step}"
        time.sleep(0.05)


class MlflowServer:
    """`mlflow server` with a sqlite backend and served artifacts (clients need no shared
    disk: artifacts go through the server)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: answers(f"{self.uri}/health"), 60, "mlflow server")

    def stop(self) -> None:
        """At once, as a crash would: what it took is committed to its store already."""
        if self.process is not None:
            kill_group(self.process)


class RayCluster:
    """A head and more nodes, each a `ray start --block` process group on 127.0.0.1.

    `env` goes to every node (e.g. RAY_AUTH_MODE=token with RAY_AUTH_TOKEN); each node gets
    `resources` (a custom resource per node makes shards land on every node).
    """

    def __init__(self, env: dict[str, str], cpus_per_node: int = 1, resources: dict | None = None):
        # the nodes' `python` is the one with shardprop's dependencies, as in the image
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0", **env}
        self.cpus = cpus_per_node
        self.resources = resources or {}
        self.port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.jobs_address = f"http://127.0.0.1:{self.dashboard_port}"
        self.client_address = f"ray://127.0.0.1:{self.client_port}"
        # short: Ray's socket paths live under it and must stay under 108 characters
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.nodes: list[subprocess.Popen] = []

    def _start(self, *args: str) -> None:
        command = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--num-cpus",
            str(self.cpus),
            "--resources",
            json.dumps(self.resources),
            "--node-ip-address",
            "127.0.0.1",
            # every node's agents on ports of their own: several nodes share this machine
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            *args,
        ]
        log = open(Path(self.temp_dir) / f"node-{len(self.nodes)}.log", "w")  # noqa: SIM115
        self.nodes.append(
            subprocess.Popen(command, env=self.env, stdout=log, stderr=log, start_new_session=True)
        )

    def start(self, nodes: int = 2) -> None:
        self._start(
            "--head",
            "--port",
            str(self.port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--ray-client-server-port",
            str(self.client_port),
            "--temp-dir",
            self.temp_dir,
            "--disable-usage-stats",
        )
        # the other nodes start once the head's GCS listens; the slow check (`ray list nodes`
        # imports Ray, seconds a call) runs once every node's `ray start` says it is up
        wait_until(self._head_listens, 90, "ray head")
        for _ in range(nodes - 1):
            self._start("--address", self.address)
        wait_until(lambda: all(map(self._says_started, self.nodes)), 90, f"{nodes} ray nodes")
        wait_until(lambda: self.alive_nodes() == nodes, 90, f"{nodes} ray nodes")

    def add_node(self) -> None:
        """One more node joins the cluster (e.g. in place of a lost one)."""
        alive = self.alive_nodes()
        self._start("--address", self.address)
        wait_until(lambda: self._says_started(self.nodes[-1]), 90, "the new ray node")
        wait_until(lambda: self.alive_nodes() > alive, 90, "the new ray node")

    def running_nodes(self) -> list[subprocess.Popen]:
        """The nodes whose `ray start` process has not ended, the head first."""
        return [node for node in self.nodes if node.poll() is None]

    def _says_started(self, node: subprocess.Popen) -> bool:
        index = self.nodes.index(node)
        if node.poll() is not None:
            raise RuntimeError(f"ray node {index} exited: {self.log(index)}")
        return "Ray runtime started" in (Path(self.temp_dir) / f"node-{index}.log").read_text()

    def _head_listens(self) -> bool:
        if self.nodes[0].poll() is not None:
            raise RuntimeError(f"ray head exited: {self.log(0)}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def alive_nodes(self) -> int:
        """Alive nodes as the cluster's own CLI reports them (through GCS, with the token)."""
        result = subprocess.run(
            [str(BIN / "ray"), "list", "nodes", "--address", self.jobs_address, "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            return 0
        try:
            return sum(node["state"] == "ALIVE" for node in json.loads(result.stdout))
        except (ValueError, KeyError, TypeError):
            return 0

    def log(self, index: int) -> str:
        return (Path(self.temp_dir) / f"node-{index}.log").read_text()[-3000:]

    @classmethod
    @contextlib.contextmanager
    def running(cls, env: dict[str, str], nodes: int = 2, **options: Any) -> Iterator["RayCluster"]:
        """A cluster of `nodes` nodes for the block, stopped however the block ends."""
        cluster = cls(env, **options)
        try:
            cluster.start(nodes=nodes)
            yield cluster
        finally:
            cluster.stop()

    def stop(self) -> None:
        stop_groups(self.nodes[::-1], seconds=5)


def train_on(cluster: RayCluster, config_text: str, tmp_path: Path) -> subprocess.Popen:
    """`shardprop train` of this config on the cluster, into tmp_path/out, tracked in
    tmp_path/mlflow.db (its schema made first, so that a test may poll the store at once)."""
    from mlflow import MlflowClient

    config = tmp_path / "run.yaml"
    config.write_text(config_text)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return start_shardprop(
        "train", config, "--address", cluster.address, "--tracking-uri", uri,
        "--output", tmp_path / "out", cwd=tmp_path,
    )  # fmt: skip


def assert_in_process_bits(config: Path, weights: Path, tmp_path: Path) -> None:
    """`weights` are, to the bit, those of the in-process run of `config` (the run that never
    lost a worker nor changed size)."""
    import numpy as np

    reference = start_shardprop(
        "train", config, "--no-tracking", "--workers", "0", "--output", tmp_path / "ref",
        cwd=tmp_path,
    )  # fmt: skip
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr
    with np.load(weights) as got, np.load(tmp_path / "ref" / "weights.npz") as want:
        for name in want.files:
            assert np.array_equal(got[name], want[name]), name
