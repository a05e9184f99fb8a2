"""What a planned run will cost, before any worker starts: memory, bytes moved, FLOPs per step.

Pure functions of the layer sizes (n0, n1, ..., nL), a shard's rows m and the dtype, so each
number can be checked by hand and `shardprop plan` can print them from metadata alone. Memory
counts what workers/network/backprop.py and workers/shard.py allocate, what Arrow reads and its
allocator keeps, and the process that holds them; FLOPs count the GEMMs only.
"""

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from shardprop.workers.data.source import SYNTHETIC_PIECE_ROWS, Source
from shardprop.workers.data.synthetic import SyntheticSpec
from shardprop.workers.network.chunks import chunk_columns
from shardprop.workers.network.params import Layout
from shardprop.workers.reduction.blocktree import BlockGrid, subtree_count

RAW_BYTES = 8  # Arrow's numbers (int64/float64) and the statistics' float64
FLAGS = 4  # booleans per row: kept, validation, training, one column's missing values
# peak RSS of a Ray worker after a 2,000-row job (measure_process_baselines, bench/data.py)
WORKER_PROCESS_BYTES = 234 * 2**20
# peak RSS of a whole in-process run of that job, MLflow tracking included (same function)
IN_PROCESS_BYTES = 297 * 2**20
# peak RSS of the coordinator of that job on 2 Ray workers, tracked (same function)
COORDINATOR_PROCESS_BYTES = 375 * 2**20
# vectors of P values the coordinator holds at once: theta, the summed and the mean gradient,
# two optimizer moments (Adam) and the update's temporaries
COORDINATOR_VECTORS = 7


def lbfgs_vectors(history_size: int) -> int:
    """lbfgs's float64 vectors beyond those: its pairs, the direction and the trial point."""
    return 2 * history_size + 2 if history_size else 0


def parameter_count(sizes: Sequence[int]) -> int:
    """P = sum over layers of n_l (n_{l-1} + 1): the flat vector [W_l | b_l], l = 1..L."""
    return Layout(tuple(sizes)).size


@dataclasses.dataclass(frozen=True)
class WorkerMemory:
    """Bytes one worker holds while training, by what holds them (network.Buffers), and its
    peak resident size."""

    batch: int  # X with its row of ones (n0 + 1, m) and the targets Y (n_L, m)
    # c columns: a chunk or a block per thread (`buffer_columns`), at most m
    activations: int  # [A[l]; 1] (n_l + 1, c) for each hidden layer, and Z[L] (n_L, c)
    deltas: int  # the two dZ/dA buffers that alternate backwards, each (max n_l, c)
    parameters: int  # theta and the gradient sum, P values each (in-process: the coordinator's)
    loading: int  # peak of the arrays while reading and preparing the rows, before the first step
    process: int = 0  # the process itself, before any row: interpreter, libraries, Ray

    @property
    def training(self) -> int:
        """Arrays held from the first step to the last."""
        return self.batch + self.activations + self.deltas + self.parameters

    @property
    def arrays(self) -> int:
        """The arrays' peak, without the process."""
        return max(self.training, self.loading)

    @property
    def peak(self) -> int:
        """Peak resident size of the worker's process: what the node must have for it."""
        return self.process + self.arrays

    @property
    def model(self) -> int:
        """The part no number of workers shrinks: parameters and a chunk's buffers."""
        return self.activations + self.deltas + self.parameters


@dataclasses.dataclass(frozen=True)
class ReadMemory:
    """What reading a shard's rows holds beside the features it has read so far."""

    buffers: int  # the piece being decoded, as Arrow holds it and as float64


def read_memory(source: Source | None, start: int, stop: int, columns: int) -> ReadMemory:
    """A worker decodes a piece at a time: from a file, one column of one row group, raw
    and decoded (the plan knows a file's rows, not its row groups: a file's rows count); a
    synthetic block of every column, made in two float64 copies. `columns`: features and
    label. No source: a shard read from one file."""
    if source is not None and source.synthetic is not None:
        return ReadMemory(2 * RAW_BYTES * columns * min(SYNTHETIC_PIECE_ROWS, stop - start))
    spans = source.spans(start, stop) if source is not None else [("", start, stop)]
    return ReadMemory(3 * RAW_BYTES * max((hi - lo for _, lo, hi in spans), default=0))


def worker_memory(
    sizes: Sequence[int],
    m: int,
    itemsize: int,
    columns: int | None = None,
    read: ReadMemory | None = None,
    validation_fraction: float = 0.0,
    process: int = 0,
    held: int | None = None,
) -> WorkerMemory:
    """The arrays a worker with m rows keeps, in a dtype of `itemsize` bytes (8 or 4), its
    activations and deltas `columns` wide (`buffer_columns`; None: m), its rows read as `read`
    says (None: nothing beside the features), a `validation_fraction` of them set aside, in a
    process of `process` bytes. `held`: bytes a feature value is held in until prepare
    (None: itemsize; 8 where the training dtype would round the values: workers/shard.py's
    held_as).

    Loading (workers/shard.py) holds the features as read, the label column and its values,
    and a few boolean flags per row; then the targets, while prepare moves the features into
    the batch one at a time, each freed once it is in (the batch's pages become resident as
    they are written): loading is that plus a feature row's temporaries, or the read's piece.
    """
    n0, *hidden, n_out = sizes
    read = read or ReadMemory(0)
    validating = validation_fraction > 0
    batch = (n0 + 1 + n_out) * m * itemsize
    width = m if columns is None else min(m, columns)
    activations = (sum(n + 1 for n in hidden) + n_out) * width * itemsize
    deltas = 2 * max(sizes[1:]) * width * itemsize
    if validating:  # the validation rows get a network, and its buffers, of their own
        activations, deltas = 2 * activations, 2 * deltas
    parameters = 2 * parameter_count(sizes) * itemsize
    features = (held or itemsize) * n0 * m
    labels = 2 * RAW_BYTES * m + FLAGS * m  # the label as Arrow and as float64, and flags
    targets = n_out * m * itemsize
    rows = 3 * RAW_BYTES * m  # one feature's selected rows and their float64 standardising
    loading = features + labels + max(read.buffers, targets + rows)
    return WorkerMemory(batch, activations, deltas, parameters, loading, process)


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class PlanEstimate:
    sizes: tuple[int, ...]  # (n0, n1, ..., nL)
    n_params: int
    shards: tuple[ShardEstimate, ...]
    traffic: StepTraffic
    flops: StepFlops  # all shards together: the whole batch
    workers: int = 0  # Ray workers; 0: the one shard lives in the coordinator's process
    dtype: str = "float64"
    coordinator: int = 0  # peak resident size of the coordinator's process; 0 in-process

    @property
    def peaks(self) -> list[int]:
        """Each worker's peak resident size, in rank order."""
        return [shard.memory.peak for shard in self.shards]


def estimate_plan(
    shards: Sequence[tuple[int, int]],
    n_features: int,
    hidden: Sequence[int],
    outputs: int,
    dtype: str,
    workers: int,
    grid: BlockGrid | None = None,
    threads: int = 1,
    source: Source | None = None,
    validation_fraction: float = 0.0,
    history_size: int = 0,
    held_itemsize: int | None = None,
) -> PlanEstimate:
    """The costs of a data plan's shards for a network; workers = 0: in-process, no traffic,
    and the one worker is the coordinator's process. `grid`: the exact reduction's blocks, run
    `threads` at a time in each worker. `source`: where the rows are read from (None: each
    shard from one file). `history_size`: the curvature pairs of lbfgs (0: another
    optimizer), float64 vectors on the coordinator. `held_itemsize`: bytes a feature value
    is held in while loading (None: the dtype's)."""
    sizes = (n_features, *hidden, outputs)
    columns = buffer_columns(sizes, dtype, threads, grid)
    itemsize = np.dtype(dtype).itemsize
    n_params = parameter_count(sizes)
    vector = n_params * itemsize
    vectors = COORDINATOR_VECTORS * vector + lbfgs_vectors(history_size) * n_params * 8
    gathered = grid and sum(subtree_count(grid, start, stop) for start, stop in shards)
    traffic = allreduce_bytes(n_params, workers, itemsize, gathered)
    per_shard = []
    for rank, (start, stop) in enumerate(shards):
        memory = worker_memory(
            sizes,
            stop - start,
            itemsize,
            columns,
            read_memory(source, start, stop, n_features + 1),
            validation_fraction,
            WORKER_PROCESS_BYTES if workers else IN_PROCESS_BYTES,
            held_itemsize,
        )
        if not workers:  # the coordinator's vectors, theta among them, in the same process
            extra = vectors - vector
            memory = dataclasses.replace(memory, parameters=memory.parameters + extra)
        per_shard.append(ShardEstimate(rank, start, stop, memory, step_flops(sizes, stop - start)))
    coordinator = 0
    if workers:  # its vectors, and a gradient sum back from each worker (or each subtree)
        returned = gathered or workers
        coordinator = COORDINATOR_PROCESS_BYTES + vectors + returned * vector
    total_rows = sum(shard.rows for shard in per_shard)
    return PlanEstimate(
        sizes,
        n_params,
        tuple(per_shard),
        traffic,
        step_flops(sizes, total_rows),
        workers,
        dtype,
        coordinator,
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
