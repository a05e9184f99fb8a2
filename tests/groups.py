"""Worker groups as a run has them before its first step, on a small two-class job: the
shared start of the tests of the step's transports."""

import os
import signal
import time

import numpy as np

from shardprop.service.cluster.group import WorkerGroup, start_group
from shardprop.service.config import load_config
from shardprop.service.training.run import make_plan, set_up_workers
from shardprop.workers.network.params import init_params
from shardprop.workers.shard import ShardWorker

SETS = ["data.synthetic={name: blobs, rows: 1001, seed: 4}", "model.hidden=[16, 8]"]


def prepared(
    workers: int, *sets: str, worker_class: type[ShardWorker] = ShardWorker, **flags
) -> tuple[WorkerGroup, np.ndarray]:
    """`workers` workers holding their shards of 1001 rows, and He-initialised parameters."""
    config = load_config(None, [*SETS, *sets], {"cluster.workers": workers, **flags})
    plan = make_plan(config)
    group = start_group(plan, config.cluster, worker_class)
    _, _, arch = set_up_workers(group, plan, config)
    return group, init_params(arch.layout, "he", 0, config.model.dtype)


def kill_and_wait(ray, actor) -> None:
    """Kill the worker's process behind the group's back, as `kill -9` would, and wait until
    Ray knows it is dead."""
    pid = ray.get(actor.__ray_call__.remote(lambda worker: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed worker still answers")
