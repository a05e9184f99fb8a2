"""The benchmark's workload, the step every figure of `shardprop bench` times, and the start
the peers share with it."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardprop.service.bench.peers import SameStart
from shardprop.service.bench.workers import BenchWorker
from shardprop.service.cluster.group import WorkerGroup, start_group
from shardprop.service.config import Config, config_from
from shardprop.service.training.optim import GradientDescent
from shardprop.service.training.reduce import batch_mean, reduce_sums
from shardprop.service.training.run import make_plan, set_up_workers
from shardprop.workers.network.backprop import Architecture
from shardprop.workers.network.params import init_params
from shardprop.workers.shard import ShardWorker

LEARNING_RATE = 0.1  # ours and every peer's, so that their losses can be compared step by step


@dataclass(frozen=True)
class Workload:
    """A synthetic binary task (blobs) and the network trained on it; the standard one by
    default."""

    rows: int = 200_000
    features: int = 64
    hidden: tuple[int, ...] = (256, 256)
    dtype: str = "float64"
    threads: int = 2  # BLAS threads of the in-process step (and of the peers)
    seed: int = 0

    def settings(self, workers: int, steps: int | None = None) -> dict[str, Any]:
        """The YAML a user would write to train this workload on `workers` workers."""
        synthetic = {"name": "blobs", "rows": self.rows, "features": self.features}
        train: dict[str, Any] = {} if steps is None else {"steps": steps}
        train["learning_rate"] = LEARNING_RATE
        return {
            "data": {"synthetic": synthetic | {"classes": 2, "seed": self.seed}},
            "model": {"hidden": list(self.hidden), "dtype": self.dtype},
            "train": train,
            "cluster": {"workers": workers, "cpus_per_worker": 1},
        }

    def config(
        self, workers: int, transport: str = "compiled", reduction: str = "rank_order"
    ) -> Config:
        """The config of a run of this workload, untracked."""
        return config_from(
            self.settings(workers),
            {
                "cluster.transport": transport,
                "train.reduction": reduction,
                "tracking.enabled": False,
            },
        )


@dataclass
class Prepared:
    """Workers holding their shards, and the parameters a step is timed at."""

    group: WorkerGroup
    theta: np.ndarray
    arch: Architecture


def prepare(
    config: Config,
    seed: int,
    method: str = "gradient",
    worker_class: type[ShardWorker] = BenchWorker,
) -> Prepared:
    """Workers holding their shards and networks, and the transport of the `method` step set
    up, as a run has them before its first step."""
    plan = make_plan(config)
    group = start_group(plan, config.cluster, worker_class)
    _, _, arch = set_up_workers(group, plan, config)
    theta = init_params(arch.layout, "he", seed, config.model.dtype)
    group.prepare_steps(theta, method)
    return Prepared(group, theta, arch)


def step(prepared: Prepared, method: str = "gradient") -> Callable[[], float]:
    """What the coordinator does per step before the optimizer: call, gather, reduce. The
    step returns the mean loss."""

    def run() -> float:
        return batch_mean(reduce_sums(prepared.group.call(method, prepared.theta))).loss

    return run


def same_start(local: Prepared) -> SameStart:
    """What the peers start from: the rows and weights of an in-process run (`--workers 0`:
    one worker holds them all)."""
    batch = local.group.workers[0].batch
    return SameStart(
        np.ascontiguousarray(batch.X1[:-1].T),
        np.ascontiguousarray(batch.Y[0]),
        [block.copy() for block in local.arch.layout.blocks(local.theta)],
        LEARNING_RATE,
    )


def our_losses(local: Prepared, steps: int) -> list[float]:
    """Our loss at each of `steps` full-batch gradient-descent steps from the same start as
    the peers. The first checks a peer's forward pass; the later ones its gradient, and for
    DDP how the workers' gradients are averaged."""
    theta = local.theta.copy()
    descent = GradientDescent()
    losses = []
    for _ in range(steps):
        mean = batch_mean(reduce_sums(local.group.call("gradient", theta)))
        losses.append(mean.loss)
        descent.step(theta, mean.grad, LEARNING_RATE)
    return losses
