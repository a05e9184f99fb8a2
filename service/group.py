"""The worker group: k ShardWorkers, in this process or as Ray actors, behind one interface.

The training loop only calls `call(method, *args)` and gets the results in rank order, so it
never imports Ray, and `--workers 0` runs the very same loop in-process.
"""

import logging
import os
from typing import Any, Protocol

import numpy as np

from service.data import DataPlan
from service.errors import TrainingError
from workers.errors import UserError
from workers.shard import ShardWorker


class WorkerGroup(Protocol):
    size: int

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run a ShardWorker method on every worker; results in rank order."""

    def close(self) -> None:
        """Stop the workers (and a Ray runtime the group started); safe to call twice."""


class LocalGroup:
    """One ShardWorker holding every row, in this process: the reference run."""

    def __init__(self, plan: DataPlan):
        self.workers = [ShardWorker(0, plan.source, plan.features, plan.label, 0, plan.total_rows)]
        self.size = 1

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(worker, method)(*args) for worker in self.workers]

    def close(self) -> None:
        self.workers.clear()


class RayGroup:
    """One Ray actor per shard, each with `cpus_per_worker` CPUs and as many BLAS threads."""

    def __init__(self, plan: DataPlan, cpus_per_worker: int, owns_runtime: bool):
        import ray

        self._ray = ray
        actor = ray.remote(ShardWorker).options(num_cpus=cpus_per_worker)
        self.actors = [
            actor.remote(rank, plan.source, plan.features, plan.label, start, stop, cpus_per_worker)
            for rank, (start, stop) in enumerate(plan.shards)
        ]
        self.size = len(self.actors)
        self._shards = plan.shards
        self._owns_runtime = owns_runtime

    def call(self, method: str, *args: Any) -> list[Any]:
        # one object-store copy per array, shared by every worker (a broadcast)
        args = tuple(self._ray.put(a) if isinstance(a, np.ndarray) else a for a in args)
        futures = [getattr(actor, method).remote(*args) for actor in self.actors]
        try:
            return self._ray.get(futures)
        except self._ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, UserError):
                raise error.cause from None
            raise
        except self._ray.exceptions.RayActorError:
            lost = next(rank for rank, future in enumerate(futures) if self._died(future))
            start, stop = self._shards[lost]
            raise TrainingError(
                f"worker {lost} (rows {start}..{stop}) was lost during {method}()"
            ) from None

    def _died(self, future: Any) -> bool:
        try:
            self._ray.get(future)
        except self._ray.exceptions.RayActorError:
            return True
        return False

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors.clear()
        if self._owns_runtime:
            self._owns_runtime = False
            self._ray.shutdown()


def connect_ray(address: str | None, cpus_needed: int) -> bool:
    """Join the cluster at `address`, or start Ray on this machine when there is none.

    A local start declares at least as many CPUs as the workers ask for, so `--workers 3`
    runs on a 2-core laptop (oversubscribed) instead of waiting forever for a free CPU.
    Returns whether this call started (or joined) the runtime, and so should shut it down.
    """
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    if address is None:
        options["num_cpus"] = max(os.cpu_count() or 1, cpus_needed)
    else:
        options["address"] = address
    ray.init(**options)
    return True


def start_group(
    plan: DataPlan, workers: int, address: str | None, cpus_per_worker: int
) -> WorkerGroup:
    if workers == 0:
        return LocalGroup(plan)
    started = connect_ray(address, workers * cpus_per_worker)
    return RayGroup(plan, cpus_per_worker, owns_runtime=started)
