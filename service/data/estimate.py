"""What a planned run will cost, before any worker starts: memory, bytes moved, FLOPs per step.

Pure functions of the layer sizes (n0, n1, ..., nL), a shard's rows m and the dtype, so each
number can be checked by hand and `shardprop plan` can print them from metadata alone. They
count what workers/network/backprop.py and workers/shard.py allocate and multiply, nothing else:
Python objects, Arrow's read buffers, Ray's own memory and elementwise passes are left out.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shardprop.workers.data.synthetic import SyntheticSpec
from shardprop.workers.network.chunks import chunk_columns
from shardprop.workers.network.params import Layout
from shardprop.workers.reduction.blocktree import BlockGrid, subtree_count

RAW_BYTES = 8  # a worker reads every column as float64 (labels: int64/float64) before prepare


def parameter_count(sizes: Sequence[int]) -> int:
    """P = sum over layers of n_l (n_{l-1} + 1): the flat vector [W_l | b_l], l = 1..L."""
    return Layout(tuple(sizes)).size


@dataclass(frozen=True)
class WorkerMemory:
    """Bytes one worker holds while training, by what holds them (network.Buffers)."""

    batch: int  # X with its row of ones (n0 + 1, m) and the targets Y (n_L, m)
    # c columns: a chunk or a block per thread (`buffer_columns`), at most m
    activations: int  # [A[l]; 1] (n_l + 1, c) for each hidden layer, and Z[L] (n_L, c)
    deltas: int  # the two dZ/dA buffers that alternate backwards, each (max n_l, c)
    parameters: int  # theta and the gradient sum, P values each
    loading: int  # peak while reading and preparing the rows, before the first step

    @property
    def training(self) -> int:
        """Held from the first step to the last."""
        return self.batch + self.activations + self.deltas + self.parameters

    @property
    def peak(self) -> int:
        return max(self.training, self.loading)


def worker_memory(
    sizes: Sequence[int], m: int, itemsize: int, columns: int | None = None
) -> WorkerMemory:
    """The arrays a worker with m rows keeps, in a dtype of `itemsize` bytes (8 or 4), its
    activations and deltas `columns` wide (`buffer_columns`; None: m).

    Loading is the larger of two moments: the read (the Arrow columns and the float64
    feature matrix side by side) and the preparation (that matrix, the labels and their
    float64 encoding beside the batch in the training dtype). The network's buffers and the
    parameters only appear at the first step, after the raw copies are freed.
    """
    n0, *hidden, n_out = sizes
    batch = (n0 + 1 + n_out) * m * itemsize
    width = m if columns is None else min(m, columns)
    activations = (sum(n + 1 for n in hidden) + n_out) * width * itemsize
    deltas = 2 * max(sizes[1:]) * width * itemsize
    parameters = 2 * parameter_count(sizes) * itemsize
    reading = RAW_BYTES * m * ((n0 + 1) + n0)
    preparing = RAW_BYTES * m * (n0 + 1 + n_out) + batch
    return WorkerMemory(batch, activations, deltas, parameters, max(reading, preparing))


@dataclass(frozen=True)
class StepFlops:
    """Floating-point operations of one forward + backward step: the GEMMs only."""

    forward: int  # Z[l] = [W_l | b_l] [A[l-1]; 1], l = 1..L
    backward_weights: int  # dW: [dW_l | db_l] = dZ[l] [A[l-1]; 1]^T, l = 1..L
    backward_inputs: int  # dA: dA[l-1] = W_l^T dZ[l], l = 2..L (no bias column, none for the input)

    @property
    def total(self) -> int:
        return self.forward + self.backward_weights + self.backward_inputs


def step_flops(sizes: Sequence[int], m: int) -> StepFlops:
    """2 m n_l k per (n_l, k) @ (k, m) product: a multiply and an add per term."""
    pairs = list(itertools.pairwise(sizes))  # (n_{l-1}, n_l), l = 1..L
    with_bias = sum(2 * m * n * (n_prev + 1) for n_prev, n in pairs)
    dA = sum(2 * m * n * n_prev for n_prev, n in pairs[1:])
    return StepFlops(forward=with_bias, backward_weights=with_bias, backward_inputs=dA)


@dataclass(frozen=True)
class StepTraffic:
    """Bytes of the all-reduce in one step, counted per worker that takes part."""

    broadcast: int  # theta as each worker receives it: one ray.put, read by k workers
    gather: int  # one gradient-sum vector from each worker back to the coordinator

    @property
    def total(self) -> int:
        return self.broadcast + self.gather


def allreduce_bytes(
    n_params: int, workers: int, itemsize: int, gathered: int | None = None
) -> StepTraffic:
    """k P bytes out and k P bytes back (`gathered` P under the exact reduction, whose
    workers send a few whole subtrees each); 0 in-process (workers = 0), where nothing moves.

    An upper bound on what crosses a network: workers on the coordinator's machine read the
    one broadcast copy from Ray's shared-memory object store. The loss, row and correct
    counts that travel with each gradient are a few scalars and are not counted.
    """
    per_vector = n_params * itemsize
    back = workers if gathered is None or not workers else gathered
    return StepTraffic(broadcast=workers * per_vector, gather=back * per_vector)


def output_units(task: str, synthetic: SyntheticSpec | None) -> int | None:
    """n_L when the config tells it; None when only the labels can (multiclass from files).

    Mirrors service/data/prepare.py's decide_task: binary and regression have one output unit,
    multiclass one per class; `auto` picks by the label values, which a synthetic spec knows.
    """
    if task in ("binary", "regression"):
        return 1
    if synthetic is None:
        return None
    classes = synthetic.n_classes
    if classes is None:  # the regression generator: auto makes it regression
        return 1 if task == "auto" else None
    if task == "auto" and classes <= 2:
        return 1
    return classes


@dataclass(frozen=True)
class ShardEstimate:
    """One worker's rows [start, stop) and what they cost it."""

    rank: int
    start: int
    stop: int
    memory: WorkerMemory
    flops: StepFlops

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class PlanEstimate:
    sizes: tuple[int, ...]  # (n0, n1, ..., nL)
    n_params: int
    shards: tuple[ShardEstimate, ...]
    traffic: StepTraffic
    flops: StepFlops  # all shards together: the whole batch


def estimate_plan(
    shards: Sequence[tuple[int, int]],
    n_features: int,
    hidden: Sequence[int],
    outputs: int,
    dtype: str,
    workers: int,
    grid: BlockGrid | None = None,
    threads: int = 1,
) -> PlanEstimate:
    """The costs of a data plan's shards for a network; workers = 0: in-process, no traffic.
    `grid`: the exact reduction's blocks, run `threads` at a time in each worker."""
    sizes = (n_features, *hidden, outputs)
    columns = buffer_columns(sizes, dtype, threads, grid)
    itemsize = np.dtype(dtype).itemsize
    n_params = parameter_count(sizes)
    per_shard = tuple(
        ShardEstimate(
            rank,
            start,
            stop,
            worker_memory(sizes, stop - start, itemsize, columns),
            step_flops(sizes, stop - start),
        )
        for rank, (start, stop) in enumerate(shards)
    )
    total_rows = sum(shard.rows for shard in per_shard)
    return PlanEstimate(
        sizes,
        n_params,
        per_shard,
        allreduce_bytes(
            n_params,
            workers,
            itemsize,
            grid and sum(subtree_count(grid, start, stop) for start, stop in shards),
        ),
        step_flops(sizes, total_rows),
    )


def buffer_columns(
    sizes: Sequence[int], dtype: str, threads: int, grid: BlockGrid | None = None
) -> int:
    """The activations' width in a worker: each thread runs a chunk of columns at a time
    (workers/network/chunks.py), or a block of the exact reduction where it is narrower."""
    chunk = chunk_columns(sizes, dtype)
    return threads * (min(chunk, grid.block_rows) if grid else chunk)


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB': powers of 1024, as memory is reported."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while count >= 1024 and power < len(units) - 1:
        count /= 1024
        power += 1
    return f"{count:.0f} B" if power == 0 else f"{count:.1f} {units[power]}"
