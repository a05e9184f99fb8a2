"""Ray Train's TorchTrainer as a peer of `shardprop bench`: DDP over gloo on 2 workers × 1 CPU,
each holding its half of the same standardised rows, starting from the same weights, with the
same loss and learning rate. Its step time and its start-up are then figures of the same
computation as ours, and its losses must equal ours to rounding to prove it.

Optional, as the other peers: it runs where torch and ray.train import
(`pip install torch "ray[train]"`); the project never depends on them. Its workers import this
module and `peers`, both kept light, so that they start as any Ray Train user's would.
"""

import time
from dataclasses import dataclass
from typing import Any

from shardprop.service.bench.peers import SameStart, torch_network
from shardprop.service.bench.timing import Timing


@dataclass
class RayTrainRun:
    """Rank 0's view of one `trainer.fit()`; the moments are seconds after fit() was called."""

    step: Timing  # one DDP step (forward, backward with the all-reduce, SGD), after a warm-up
    losses: list[float]  # full-batch mean loss of each step's forward pass
    to_train_function: float  # the training function starts running
    to_first_step: float  # shard built, model wrapped in DDP: the first step starts
    to_first_step_done: float
    to_return: float  # fit() returns


def available() -> bool:
    """Whether this environment has the peer's optional packages."""
    try:
        import ray.train.torch  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def fit_ray_train(start: SameStart, steps: int, workers: int = 2) -> RayTrainRun:
    """`steps` full-batch SGD steps with TorchTrainer on the Ray runtime this process is
    connected to (ray.init() first when there is none, as Ray Train would do)."""
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = {
        # in the object store once; each worker copies its half out of shared memory
        "X": ray.put(start.X),
        "y": ray.put(start.y),
        "blocks": start.blocks,
        "steps": steps,
        "learning_rate": start.learning_rate,
    }
    with tempfile.TemporaryDirectory(prefix="shardprop-raytrain-") as storage:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="shardprop-bench", storage_path=storage),
        )
        called = time.time()  # wall clock: the moments below are taken in other processes
        result = trainer.fit()
        returned = time.time()
    metrics = result.return_value  # rank 0's
    return RayTrainRun(
        step=Timing.over(metrics["step_seconds"][1:] or metrics["step_seconds"]),
        losses=metrics["losses"],
        to_train_function=metrics["entered"] - called,
        to_first_step=metrics["first_step_started"] - called,
        to_first_step_done=metrics["first_step_done"] - called,
        to_return=returned - called,
    )


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: its contiguous share of the rows, our model and weights in DDP,
    full-batch SGD. Returns its step times, the full-batch losses and when it got going
    (Ray Train hands rank 0's return to the driver; its metrics keep reports only with a
    checkpoint)."""
    entered = time.time()
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    torch.set_num_threads(1)  # one CPU per worker, as each shardprop worker has
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    X, y = ray.get(config["X"]), ray.get(config["y"])
    total_rows = len(y)
    lo, hi = rank * total_rows // world, (rank + 1) * total_rows // world
    X_shard, y_shard = torch.from_numpy(X[lo:hi].copy()), torch.from_numpy(y[lo:hi].copy())
    del X, y  # the shard is a copy: the whole batch stays in the object store only
    model = prepare_model(torch_network(config["blocks"]))  # DistributedDataParallel on CPU
    optimizer = torch.optim.SGD(model.parameters(), lr=config["learning_rate"])
    loss_sum = torch.nn.BCEWithLogitsLoss(reduction="sum")
    # DDP averages the workers' gradients: each worker's sum × world / total rows makes that
    # average the full-batch mean gradient, for equal shards or not
    scale = world / total_rows
    seconds: list[float] = []
    losses: list[torch.Tensor] = []
    first_step_started = time.time()
    for _ in range(config["steps"]):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_sum(model(X_shard).squeeze(1), y_shard)
        (loss * scale).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        losses.append(loss.detach())
        if len(seconds) == 1:
            first_step_done = time.time()
    shard_losses = torch.stack(losses)
    dist.all_reduce(shard_losses)  # sums over the workers, once, after the timed steps
    return {
        "step_seconds": seconds,
        "losses": (shard_losses / total_rows).tolist(),
        "entered": entered,
        "first_step_started": first_step_started,
        "first_step_done": first_step_done,
    }
