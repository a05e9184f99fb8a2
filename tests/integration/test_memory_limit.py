"""A shard loaded near a worker's memory limit. A Ray actor reserves memory for its load;
Ray's `memory` resource only reserves it and does not hold a process to it, so the kernel
does, as a container's limit would: the actor goes into a memory cgroup that lets it take
what the plan gives the load and no more. The lean load fits; the plain read of the same
shard (an Arrow table, then the feature matrix from it) is killed by the kernel."""

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shardprop.service.bench.data import measure_load, run_settings, write_dataset
from shardprop.service.cluster.capacity import estimate_run
from shardprop.service.config import config_from
from shardprop.service.training.run import make_plan

ROWS, FEATURES = 800_000, 64  # 205 MB of float32 rows, one worker's shard
HEADROOM = 48 * 2**20  # a piece being read, the reader's threads and Arrow's own buffers


def planned_load(data: str) -> int:
    """The bytes the plan gives the one worker's load of `data` in float32."""
    settings = run_settings(data, 1)
    settings["model"]["dtype"] = "float32"
    config = config_from(settings)
    (shard,) = estimate_run(config, make_plan(config), 3).shards
    return shard.memory.loading


def plain_read(data: str) -> int:
    """What a worker without the lean load does: the shard as a table, then its matrix."""
    table = pq.read_table(data)
    features = [name for name in table.column_names if name != "y"]
    return np.column_stack([table.column(name).to_numpy() for name in features]).nbytes


class Loader:
    """The actor: one load of a shard, the lean one (a run's worker's) or the plain one."""

    def pid(self) -> int:
        return os.getpid()

    def load(self, how: str, data: str) -> str:
        if how == "lean":
            measure_load(data, "float32", 0.0, 1)
        else:
            plain_read(data)
        return "fits"


class MemoryCgroup:
    """A cgroup (v1) below this process's own that holds what its members allocate from now
    on to `limit` bytes: the kernel's OOM killer ends a member that needs more."""

    def __init__(self, limit: int):
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        own = next((line.split(":", 2)[2] for line in lines if ":memory:" in line), "/")
        self.limit = limit
        self.path = Path("/sys/fs/cgroup/memory", own.lstrip("/"), f"shardprop-{uuid.uuid4().hex}")
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        deadline = time.monotonic() + 30
        while (self.path / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)  # the killed actor's process is on its way out
        self.path.rmdir()


@pytest.fixture
def cgroup(shard) -> Iterator[MemoryCgroup]:
    try:
        group = MemoryCgroup(planned_load(shard) + HEADROOM)
    except OSError as error:  # not root, or no cgroup v1 memory controller
        pytest.skip(f"needs a memory cgroup this process may make: {error}")
    try:
        yield group
    finally:
        group.remove()


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shard") / "blobs"
    return str(write_dataset(folder, ROWS, 4, FEATURES, "float32"))


@pytest.mark.parametrize("how", ["lean", "plain"])
def test_the_lean_load_fits_the_planned_memory_where_the_plain_read_does_not(
    ray_session, shard, cgroup, how
):
    import ray

    assert cgroup.limit < 2 * ROWS * FEATURES * 4  # less than a table and a matrix of the rows
    actor = ray.remote(Loader).options(num_cpus=1, memory=cgroup.limit).remote()
    try:
        cgroup.add(ray.get(actor.pid.remote(), timeout=120))
        if how == "lean":
            assert ray.get(actor.load.remote(how, shard), timeout=300) == "fits"
            assert cgroup.oom_kills() == 0
        else:
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(actor.load.remote(how, shard), timeout=300)
            assert cgroup.oom_kills() == 1
    finally:
        ray.kill(actor)
