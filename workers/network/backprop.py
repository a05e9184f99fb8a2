"""Forward and back-propagation of a fully-connected network on one shard of rows.

Samples are columns (DESIGN.md §1): A[0] = X is (n0, m). Every activation buffer carries an
extra last row of ones, so Z[l] = [W_l | b_l] @ [A[l-1]; 1] is one GEMM and so is
[dW_l | db_l] = dZ[l] @ [A[l-1]; 1]^T. Buffers live as long as the Network and are reused
every step: fresh multi-hundred-MB arrays cost more than the arithmetic on them.

Each thread runs its columns through forward and backward a chunk at a time, through buffers
one chunk wide: a GEMM's output is then still in cache when the elementwise pass and the
next GEMM read it, and a worker's activations take a few MB instead of the whole shard's
hundreds (`chunk_columns`).
"""

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info

from shardprop.workers.network.activations import ACTIVATIONS, DERIVATIVES
from shardprop.workers.network.losses import OUTPUTS
from shardprop.workers.network.params import Layout
from shardprop.workers.reduction.blocktree import BlockGrid, Node, add_node
from shardprop.workers.reduction.sums import BlockSums, ShardSums, Sums

TASKS = tuple(OUTPUTS)
T = TypeVar("T")
# chunk(lo, hi, buffers, into): columns [lo, hi) of the batch through the buffers, their sums
# in `into`; returns them and the forward pass's seconds
Chunk = Callable[[int, int, "Buffers", np.ndarray], tuple[Sums, float]]
# fewer rows than this per part are not worth a thread
PART_MIN_ROWS = 2048
# A chunk's widest activation is about CHUNK_BYTES, within CHUNK_COLUMNS. Measured on the
# 2-core EPYC (L2 1 MiB a core), one thread's forward + backward against the whole columns
# at once, 100,000 rows of [256, 256] unless said, over several runs (the host drifts):
# float64 0.96-1.00 with 512-768 columns (1024: 0.97-0.99, 2048: 1.00); float32 0.93-0.94
# with 1024 (512: 0.93); 250,000 rows of [64, 64] 0.88 in float64 with 2048 and 0.81 in
# float32 with 4096. Wide layers gain little and narrow chunks lose: [512, 512] and
# [1024, 1024] at 512-1024 columns 0.99-1.02, at 256 1.04, at 128 1.11.
CHUNK_BYTES = 2**20
CHUNK_COLUMNS = (512, 4096)
# chunks as wide as a multiple of this: 510-column chunks (100,000 columns in 196 equal ones)
# took 1.03 of the whole columns' time in float64 where 512-column ones took 0.96
CHUNK_ALIGN = 64


def chunk_columns(sizes: Sequence[int], dtype: np.dtype | str) -> int:
    """Columns a thread runs through forward and backward at a time."""
    fit = CHUNK_BYTES // (max(sizes[1:]) * np.dtype(dtype).itemsize)
    low, high = CHUNK_COLUMNS
    return min(high, max(low, fit // 256 * 256))


@dataclass(frozen=True)
class Architecture:
    """Everything that fixes the function the network computes, apart from its parameters."""

    sizes: tuple[int, ...]  # (n0, n1, ..., nL)
    activation: str = "relu"
    task: str = "binary"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.task not in OUTPUTS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")

    @property
    def layout(self) -> Layout:
        return Layout(tuple(int(n) for n in self.sizes))


class Batch:
    """A shard's rows, held the way the network wants them: X with a row of ones, Y."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, dtype: np.dtype | str | None = None):
        """X is (n0, m), Y is (n_L, m); both are copied into the batch's own buffers."""
        dtype = np.dtype(dtype or X.dtype)
        n0, m = X.shape
        self.X1 = np.empty((n0 + 1, m), dtype=dtype)  # (n0 + 1, m)
        self.X1[:n0] = X
        self.X1[n0] = 1
        self.Y = np.ascontiguousarray(Y, dtype=dtype)  # (n_L, m)
        if self.Y.ndim != 2 or self.Y.shape[1] != m:
            raise ValueError(f"Y must have shape (n_L, {m}), got {self.Y.shape}")

    @property
    def X(self) -> np.ndarray:
        """The features (n0, m), a view: standardise in place through it."""
        return self.X1[:-1]

    @property
    def rows(self) -> int:
        return self.X1.shape[1]


class Buffers:
    """The activations and deltas of `width` columns, kept between steps: [A[l]; 1] for
    each hidden layer l (its row of ones set once), Z[L], and two delta buffers between
    which dZ of layer l and dA of layer l-1 alternate."""

    def __init__(self, sizes: tuple[int, ...], width: int, dtype: np.dtype):
        self.width = width
        self.A1 = []
        for n in sizes[1:-1]:
            A1 = np.empty((n + 1, width), dtype=dtype)
            A1[n] = 1
            self.A1.append(A1)
        self.Z_out = np.empty((sizes[-1], width), dtype=dtype)
        self.delta = [np.empty((max(sizes[1:]), width), dtype=dtype) for _ in range(2)]


class Network:
    """One architecture in one dtype, with a chunk's buffers per thread kept between calls."""

    def __init__(
        self, arch: Architecture, dtype: np.dtype | str = np.float64, threads: int | None = None
    ):
        """`threads` for the elementwise passes; None: as many as BLAS uses now."""
        self.arch = arch
        self.layout = arch.layout
        self.dtype = np.dtype(dtype)
        self._activate = ACTIVATIONS[arch.activation]
        self._derivative = DERIVATIVES[arch.activation]
        self._output = OUTPUTS[arch.task]
        self.chunk = chunk_columns(self.layout.sizes, self.dtype)
        self._per_thread: list[Buffers] = []  # a chunk's or a block's columns, one per thread
        if threads is None:
            threads = max(
                (i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1
            )
        self.threads = threads
        # With several threads the batch's columns are cut into one part per thread, each run
        # through forward and backward by single-threaded BLAS, like workers in one process:
        # numpy's elementwise passes then use every core too, and no BLAS thread sits
        # spin-waiting on a core between GEMMs. The parts' sums are added in a fixed order.
        self._pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None
        self._blas = ThreadpoolController() if threads > 1 else None

    def _scratch(self, parts: int, width: int) -> list[Buffers]:
        """One set of buffers per part, at least `width` columns wide; kept between calls
        and only ever grown, so that a step allocates none."""
        have = self._per_thread
        if len(have) < parts or have[0].width < width:
            parts, width = max(parts, len(have)), max(width, have[0].width if have else 0)
            self._per_thread = []  # freed before the new ones are made
            self._per_thread = [Buffers(self.layout.sizes, width, self.dtype) for _ in range(parts)]
        return self._per_thread

    def _forward(self, theta: np.ndarray, X1: np.ndarray, buffers: Buffers) -> list[np.ndarray]:
        """Forward over the columns X1 ((n0 + 1, w)) into the buffers' first w columns;
        returns views of [A[0]; 1], ..., [A[L-1]; 1], Z[L] on those columns."""
        w = X1.shape[1]
        inputs = [X1] + [A1[:, :w] for A1 in buffers.A1]  # [A[l]; 1]
        outputs = [A1[:-1] for A1 in inputs[1:]] + [buffers.Z_out[:, :w]]  # Z[l], then A[l]
        for l, block in enumerate(self.layout.blocks(theta)):
            np.matmul(block, inputs[l], out=outputs[l])
            if l < self.layout.depth - 1:
                self._activate(outputs[l])
        return [*inputs, outputs[-1]]

    def _check(self, theta: np.ndarray, batch: Batch) -> None:
        if theta.dtype != self.dtype or theta.shape != (self.layout.size,):
            raise ValueError(
                f"theta must be a flat {self.dtype} vector of {self.layout.size} values, "
                f"got {theta.dtype} {theta.shape}"
            )
        if batch.X1.dtype != self.dtype or batch.X1.shape[0] != self.layout.sizes[0] + 1:
            raise ValueError(
                f"batch must hold {self.layout.sizes[0]} {self.dtype} features, "
                f"got {batch.X1.shape[0] - 1} {batch.X1.dtype}"
            )

    def _side_by_side(self, run: Callable[[int, int, int], T], count: int, parts: int) -> list[T]:
        """run(part, lo, hi) over [0, count) cut into `parts` contiguous ranges, the first in
        this thread and the others on the pool, all on single-threaded BLAS; results in
        order."""
        cuts = [count * i // parts for i in range(parts + 1)]
        if parts == 1:
            return [run(0, 0, count)]
        with self._blas.limit(limits=1, user_api="blas"):
            futures = [
                self._pool.submit(run, part, lo, hi)
                for part, (lo, hi) in enumerate(pairwise(cuts[1:]), start=1)
            ]
            return [run(0, 0, cuts[1]), *(future.result() for future in futures)]

    def gradient(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward and backward over the whole batch: the shard's sums."""
        self._check(theta, batch)
        total, forward_seconds = self._parts(
            partial(self._backprop, theta, batch), batch.rows, theta
        )
        return ShardSums(
            total.grad, total.loss, total.rows, total.correct, forward_seconds=forward_seconds
        )

    def evaluate(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward only: loss sum and correct count (grad is empty)."""
        self._check(theta, batch)
        empty = np.empty(0, self.dtype)
        total, _ = self._parts(partial(self._evaluate, theta, batch), batch.rows, empty)
        return ShardSums(total.grad, total.loss, total.rows, total.correct)

    def block_gradient(
        self, theta: np.ndarray, batch: Batch, bounds: Sequence[int], first: int, grid: BlockGrid
    ) -> BlockSums:
        """The exact reduction's sums (workers.blocktree): block j of the batch, columns
        [bounds[j], bounds[j + 1]), is the dataset's block first + j. Each block is run on
        its own, in chunks that depend on its bounds alone, on single-threaded BLAS whatever
        the thread count: its bits are the same in any worker. The blocks are added up into
        the whole subtrees they make."""
        self._check(theta, batch)
        return self._blocks(partial(self._backprop, theta, batch), bounds, first, grid, theta)

    def block_evaluate(
        self, theta: np.ndarray, batch: Batch, bounds: Sequence[int], first: int, grid: BlockGrid
    ) -> BlockSums:
        """`evaluate` block by block, added along the block tree like `block_gradient`."""
        self._check(theta, batch)
        empty = np.empty(0, self.dtype)
        return self._blocks(partial(self._evaluate, theta, batch), bounds, first, grid, empty)

    def _parts(self, chunk: Chunk, m: int, like: np.ndarray) -> tuple[Sums, float]:
        """`chunk` over columns [0, m), one contiguous part per thread, the parts' sums
        added in part order: the same bits every call. Returns the sums and the first
        part's forward seconds (the parts ran side by side)."""
        parts = min(self.threads, max(1, m // PART_MIN_ROWS))
        scratch = self._scratch(parts, min(self.chunk, -(-m // parts)))

        def part(index: int, lo: int, hi: int) -> tuple[Sums, float]:
            return self._in_chunks(chunk, lo, hi, scratch[index], np.empty_like(like))

        results = self._side_by_side(part, m, parts)
        total = results[0][0]
        for sums, _ in results[1:]:
            total += sums
        return total, results[0][1]

    def _blocks(
        self,
        chunk: Chunk,
        bounds: Sequence[int],
        first: int,
        grid: BlockGrid,
        like: np.ndarray,
    ) -> BlockSums:
        """`chunk` over each block, one contiguous range of blocks per thread, folded into
        the block tree as they come.

        Every node here is this call's own, so siblings are added in place and the right
        one's buffer serves a later block: a step allocates a few buffers, not one a block."""
        count = len(bounds) - 1
        parts = min(self.threads, count)
        widest = max(hi - lo for lo, hi in pairwise(bounds))
        scratch = self._scratch(parts, min(self.chunk, widest))
        spare: list[np.ndarray] = []  # list.append and list.pop are atomic: shared by threads

        def join(left: Sums, right: Sums) -> Sums:
            left += right
            spare.append(right.grad)
            return left

        def blocks(part: int, lo: int, hi: int) -> tuple[dict[Node, Sums], float]:
            nodes: dict[Node, Sums] = {}
            forward_seconds = 0.0
            for j in range(lo, hi):
                into = spare.pop() if spare else np.empty_like(like)
                sums, seconds = self._in_chunks(
                    chunk, bounds[j], bounds[j + 1], scratch[part], into
                )
                add_node(nodes, (0, first + j), sums, grid, join)
                forward_seconds += seconds
            return nodes, forward_seconds

        results = self._side_by_side(blocks, count, parts)
        total = BlockSums(forward_seconds=results[0][1], grid=grid)
        for nodes, _ in results:
            for node, sums in nodes.items():
                add_node(total.nodes, node, sums, grid, join)
        return total

    def _in_chunks(
        self, chunk: Chunk, lo: int, hi: int, buffers: Buffers, into: np.ndarray
    ) -> tuple[Sums, float]:
        """`chunk` over columns [lo, hi) cut into as few chunks of at most `self.chunk`
        columns as there can be, all but the last a multiple of CHUNK_ALIGN columns wide and
        the last no runt, through `buffers`; the sums added in column order into `into`.
        Returns them and the forward seconds."""
        count = max(1, -(-(hi - lo) // self.chunk))
        even = -(-(hi - lo) // count)  # columns per chunk, cut evenly
        width = max(1, min(self.chunk, -(-even // CHUNK_ALIGN) * CHUNK_ALIGN))
        sums, forward_seconds = chunk(lo, min(hi, lo + width), buffers, into)
        spare = np.empty_like(into) if hi - lo > width else into
        for start in range(lo + width, hi, width):
            more, seconds = chunk(start, min(hi, start + width), buffers, spare)
            sums += more
            forward_seconds += seconds
        return sums, forward_seconds

    def _loss(self, Z_out: np.ndarray, Y: np.ndarray, buffers: Buffers) -> tuple[float, int | None]:
        """Loss sum and correct count of the buffers' first columns; their dZ[L] lands in
        the delta buffer that back-propagation starts from."""
        L, sizes = self.layout.depth, self.layout.sizes
        dZ = buffers.delta[L % 2][: sizes[L], : Z_out.shape[1]]
        return self._output.loss_and_delta(Z_out, Y, dZ), self._output.correct(Z_out, Y)

    def _backprop(
        self, theta: np.ndarray, batch: Batch, lo: int, hi: int, buffers: Buffers, grad: np.ndarray
    ) -> tuple[Sums, float]:
        """Forward and backward on columns [lo, hi) of the batch, through the buffers' first
        columns; the gradient sum goes into `grad`. Returns the sums over those columns and
        the forward pass's seconds."""
        L = self.layout.depth
        sizes = self.layout.sizes
        w = hi - lo
        started = time.perf_counter()
        *inputs, Z_out = self._forward(theta, batch.X1[:, lo:hi], buffers)
        forward_seconds = time.perf_counter() - started
        blocks = self.layout.blocks(theta)
        loss, correct = self._loss(Z_out, batch.Y[:, lo:hi], buffers)
        delta = buffers.delta
        dZ = delta[L % 2][: sizes[L], :w]  # (n_L, w), as _loss left it
        grad_blocks = self.layout.blocks(grad)
        for l in range(L, 0, -1):
            A1_prev = inputs[l - 1]  # (n_{l-1} + 1, w)
            np.matmul(dZ, A1_prev.T, out=grad_blocks[l - 1])  # [dW_l | db_l]
            if l > 1:
                dA = delta[(l - 1) % 2][: sizes[l - 1], :w]
                np.matmul(blocks[l - 1][:, :-1].T, dZ, out=dA)  # W_l^T dZ[l] = dA[l-1]
                self._derivative(A1_prev[:-1], dA)  # now dZ[l-1]
                dZ = dA
        return Sums(grad, loss, w, correct), forward_seconds

    def _evaluate(
        self, theta: np.ndarray, batch: Batch, lo: int, hi: int, buffers: Buffers, empty: np.ndarray
    ) -> tuple[Sums, float]:
        """Loss sum and correct count of columns [lo, hi), through the buffers' first."""
        *_, Z_out = self._forward(theta, batch.X1[:, lo:hi], buffers)
        loss, correct = self._loss(Z_out, batch.Y[:, lo:hi], buffers)
        return Sums(empty, loss, hi - lo, correct), 0.0

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output activations (n_L, m) for features X (n0, m): probabilities or values."""
        batch = Batch(X, np.empty((self.layout.sizes[-1], X.shape[1])), self.dtype)
        self._check(theta, batch)
        m = batch.rows
        A_out = np.empty((self.layout.sizes[-1], m), self.dtype)
        buffers = self._scratch(1, min(self.chunk, m))[0]
        for lo in range(0, m, self.chunk):
            *_, Z_out = self._forward(theta, batch.X1[:, lo : lo + self.chunk], buffers)
            A_out[:, lo : lo + self.chunk] = self._output.predict(Z_out)
        return A_out
