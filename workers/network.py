"""Forward and back-propagation of a fully-connected network on one shard of rows.

Samples are columns (DESIGN.md §1): A[0] = X is (n0, m). Every activation buffer carries an
extra last row of ones, so Z[l] = [W_l | b_l] @ [A[l-1]; 1] is one GEMM and so is
[dW_l | db_l] = dZ[l] @ [A[l-1]; 1]^T. Buffers live as long as the Network and are reused
every step: fresh multi-hundred-MB arrays cost more than the arithmetic on them.
"""

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info

from workers.activations import ACTIVATIONS, DERIVATIVES
from workers.blocktree import BlockGrid, Node, add_node
from workers.losses import OUTPUTS
from workers.params import Layout
from workers.sums import BlockSums, ShardSums, Sums

TASKS = tuple(OUTPUTS)
T = TypeVar("T")
# fewer rows than this per part are not worth a thread
PART_MIN_ROWS = 2048


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
    """One architecture in one dtype, with the buffers for one batch size kept between calls."""

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
        self._whole: Buffers | None = None  # the whole batch's columns
        self._per_thread: list[Buffers] = []  # one block's columns, one set per thread
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

    def _buffers_for(self, m: int) -> Buffers:
        if self._whole is None or self._whole.width != m:
            self._whole = None  # freed before the new ones are made
            self._whole = Buffers(self.layout.sizes, m, self.dtype)
        return self._whole

    def _forward(
        self, theta: np.ndarray, X1: np.ndarray, buffers: Buffers, lo: int, hi: int
    ) -> list[np.ndarray]:
        """Forward over the columns X1 ((n0 + 1, hi - lo)) into columns [lo, hi) of the
        buffers; returns views of [A[0]; 1], ..., [A[L-1]; 1], Z[L] on those columns."""
        inputs = [X1] + [A1[:, lo:hi] for A1 in buffers.A1]  # [A[l]; 1]
        outputs = [A1[:-1] for A1 in inputs[1:]] + [buffers.Z_out[:, lo:hi]]  # Z[l], then A[l]
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
        m = batch.rows
        buffers = self._buffers_for(m)

        def part(_: int, lo: int, hi: int) -> tuple[Sums, float]:
            return self._backprop(theta, batch, lo, hi, np.empty_like(theta), buffers, lo)

        parts = self._side_by_side(part, m, min(self.threads, max(1, m // PART_MIN_ROWS)))
        total = parts[0][0]
        for sums, _ in parts[1:]:
            total += sums  # in part order: the same bits every call
        forward_seconds = parts[0][1]  # the parts ran side by side: the first one's clock
        return ShardSums(
            total.grad, total.loss, total.rows, total.correct, forward_seconds=forward_seconds
        )

    def block_gradient(
        self, theta: np.ndarray, batch: Batch, bounds: Sequence[int], first: int, grid: BlockGrid
    ) -> BlockSums:
        """The exact reduction's sums (workers.blocktree): block j of the batch, columns
        [bounds[j], bounds[j + 1]), is the dataset's block first + j. Each block is run on
        its own, through buffers of its own width, on single-threaded BLAS whatever the
        thread count: its bits are the same in any worker. The blocks are added up into the
        whole subtrees they make."""
        self._check(theta, batch)

        def block(j: int, buffers: Buffers, grad: np.ndarray) -> tuple[Sums, float]:
            lo, hi = bounds[j], bounds[j + 1]
            return self._backprop(theta, batch, lo, hi, grad, buffers, 0)

        return self._blocks(block, bounds, first, grid, theta)

    def block_evaluate(
        self, theta: np.ndarray, batch: Batch, bounds: Sequence[int], first: int, grid: BlockGrid
    ) -> BlockSums:
        """`evaluate` block by block, added along the block tree like `block_gradient`."""
        self._check(theta, batch)

        def block(j: int, buffers: Buffers, empty: np.ndarray) -> tuple[Sums, float]:
            lo, hi = bounds[j], bounds[j + 1]
            *_, Z_out = self._forward(theta, batch.X1[:, lo:hi], buffers, 0, hi - lo)
            loss, correct = self._loss(Z_out, batch.Y[:, lo:hi], buffers, 0, hi - lo)
            return Sums(empty, loss, hi - lo, correct), 0.0

        return self._blocks(block, bounds, first, grid, np.empty(0, self.dtype))

    def _blocks(
        self,
        block: Callable[[int, Buffers, np.ndarray], tuple[Sums, float]],
        bounds: Sequence[int],
        first: int,
        grid: BlockGrid,
        like: np.ndarray,
    ) -> BlockSums:
        """block(j, its thread's buffers, a sums buffer shaped like `like`) for each block,
        one contiguous range of blocks per thread, folded into the block tree as they come.

        Every node here is this call's own, so siblings are added in place and the right
        one's buffer serves a later block: a step allocates a few buffers, not one a block.
        The activations need one block's width per thread, not the whole batch's."""
        count = len(bounds) - 1
        parts = min(self.threads, count)
        width = max(hi - lo for lo, hi in pairwise(bounds))
        if len(self._per_thread) < parts or self._per_thread[0].width != width:
            self._per_thread = [Buffers(self.layout.sizes, width, self.dtype) for _ in range(parts)]
        spare: list[np.ndarray] = []  # list.append and list.pop are atomic: shared by threads

        def join(left: Sums, right: Sums) -> Sums:
            left += right
            spare.append(right.grad)
            return left

        def blocks(part: int, lo: int, hi: int) -> tuple[dict[Node, Sums], float]:
            nodes: dict[Node, Sums] = {}
            forward_seconds = 0.0
            for j in range(lo, hi):
                grad = spare.pop() if spare else np.empty_like(like)
                sums, seconds = block(j, self._per_thread[part], grad)
                add_node(nodes, (0, first + j), sums, grid, join)
                forward_seconds += seconds
            return nodes, forward_seconds

        results = self._side_by_side(blocks, count, parts)
        total = BlockSums(forward_seconds=results[0][1], grid=grid)
        for nodes, _ in results:
            for node, sums in nodes.items():
                add_node(total.nodes, node, sums, grid, join)
        return total

    def _loss(
        self, Z_out: np.ndarray, Y: np.ndarray, buffers: Buffers, lo: int, hi: int
    ) -> tuple[float, int | None]:
        """Loss sum and correct count of columns [lo, hi) of the buffers; their dZ[L] lands in
        the delta buffer that back-propagation starts from."""
        L, sizes = self.layout.depth, self.layout.sizes
        dZ = buffers.delta[L % 2][: sizes[L], lo:hi]
        return self._output.loss_and_delta(Z_out, Y, dZ), self._output.correct(Z_out, Y)

    def _backprop(
        self,
        theta: np.ndarray,
        batch: Batch,
        lo: int,
        hi: int,
        grad: np.ndarray,
        buffers: Buffers,
        at: int,
    ) -> tuple[Sums, float]:
        """Forward and backward on columns [lo, hi) of the batch, through the buffers'
        columns from `at` on; the gradient sum goes into `grad`. Returns the sums over those
        columns and the forward pass's seconds."""
        L = self.layout.depth
        sizes = self.layout.sizes
        end = at + hi - lo
        started = time.perf_counter()
        *inputs, Z_out = self._forward(theta, batch.X1[:, lo:hi], buffers, at, end)
        forward_seconds = time.perf_counter() - started
        blocks = self.layout.blocks(theta)
        loss, correct = self._loss(Z_out, batch.Y[:, lo:hi], buffers, at, end)
        delta = buffers.delta
        dZ = delta[L % 2][: sizes[L], at:end]  # (n_L, hi - lo), as _loss left it
        grad_blocks = self.layout.blocks(grad)
        for l in range(L, 0, -1):
            A1_prev = inputs[l - 1]  # (n_{l-1} + 1, hi - lo)
            np.matmul(dZ, A1_prev.T, out=grad_blocks[l - 1])  # [dW_l | db_l]
            if l > 1:
                dA = delta[(l - 1) % 2][: sizes[l - 1], at:end]
                np.matmul(blocks[l - 1][:, :-1].T, dZ, out=dA)  # W_l^T dZ[l] = dA[l-1]
                self._derivative(A1_prev[:-1], dA)  # now dZ[l-1]
                dZ = dA
        return Sums(grad, loss, hi - lo, correct), forward_seconds

    def evaluate(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward only: loss sum and correct count (grad is empty)."""
        self._check(theta, batch)
        m = batch.rows
        buffers = self._buffers_for(m)
        *_, Z_out = self._forward(theta, batch.X1, buffers, 0, m)
        loss, correct = self._loss(Z_out, batch.Y, buffers, 0, m)
        return ShardSums(grad=np.empty(0, self.dtype), loss=loss, rows=m, correct=correct)

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output activations (n_L, m) for features X (n0, m): probabilities or values."""
        batch = Batch(X, np.empty((self.layout.sizes[-1], X.shape[1])), self.dtype)
        self._check(theta, batch)
        buffers = self._buffers_for(batch.rows)
        *_, Z_out = self._forward(theta, batch.X1, buffers, 0, batch.rows)
        return self._output.predict(Z_out)
