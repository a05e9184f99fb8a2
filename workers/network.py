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
        self._rows = -1
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

    def _buffers_for(self, m: int) -> None:
        if m == self._rows:
            return
        sizes = self.layout.sizes
        hidden = sizes[1:-1]
        self._A1 = []  # [A[l]; 1] for hidden l, each (n_l + 1, m)
        for n in hidden:
            A1 = np.empty((n + 1, m), dtype=self.dtype)
            A1[n] = 1
            self._A1.append(A1)
        self._Z_out = np.empty((sizes[-1], m), dtype=self.dtype)  # (n_L, m)
        # dZ of layer l and dA of layer l-1 alternate between two buffers
        widest = max(sizes[1:])
        self._delta = [np.empty(widest * m, dtype=self.dtype) for _ in range(2)]
        self._rows = m

    def _forward(
        self, theta: np.ndarray, X1: np.ndarray, lo: int = 0, hi: int | None = None
    ) -> list[np.ndarray]:
        """Fill columns [lo, hi) of the buffers (sized for X1 already); returns views of
        [A[0]; 1], ..., [A[L-1]; 1], Z[L] on those columns."""
        inputs = [X1[:, lo:hi]] + [A1[:, lo:hi] for A1 in self._A1]  # [A[l]; 1]
        outputs = [A1[:-1] for A1 in inputs[1:]] + [self._Z_out[:, lo:hi]]  # Z[l], then A[l]
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

    def _side_by_side(self, run: Callable[[int, int], T], count: int, parts: int) -> list[T]:
        """run(lo, hi) over [0, count) cut into `parts` contiguous ranges, the first in this
        thread and the others on the pool, all on single-threaded BLAS; results in order."""
        cuts = [count * i // parts for i in range(parts + 1)]
        if parts == 1:
            return [run(0, count)]
        with self._blas.limit(limits=1, user_api="blas"):
            futures = [self._pool.submit(run, lo, hi) for lo, hi in pairwise(cuts[1:])]
            return [run(0, cuts[1]), *(future.result() for future in futures)]

    def gradient(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward and backward over the whole batch: the shard's sums."""
        self._check(theta, batch)
        m = batch.rows
        self._buffers_for(m)

        def part(lo: int, hi: int) -> tuple[Sums, float]:
            grad = np.empty_like(theta)
            return self._backprop(theta, batch, lo, hi, grad)

        parts = self._side_by_side(part, m, min(self.threads, max(1, m // PART_MIN_ROWS)))
        total = parts[0][0]
        for sums, _ in parts[1:]:
            total.grad += sums.grad  # in part order: the same bits every call
            total.loss += sums.loss
            if total.correct is not None:
                total.correct += sums.correct
        forward_seconds = parts[0][1]  # the parts ran side by side: the first one's clock
        return ShardSums(total.grad, total.loss, m, total.correct, forward_seconds=forward_seconds)

    def block_gradient(
        self, theta: np.ndarray, batch: Batch, bounds: Sequence[int], first: int, grid: BlockGrid
    ) -> BlockSums:
        """The exact reduction's sums (workers.blocktree): block j of the batch, columns
        [bounds[j], bounds[j + 1]), is the dataset's block first + j; each block on its own,
        on single-threaded BLAS whatever the thread count, so its bits are the same in any
        worker; the blocks added up into the whole subtrees they make."""
        self._check(theta, batch)
        self._buffers_for(batch.rows)

        def block(j: int, grad: np.ndarray) -> tuple[Sums, float]:
            return self._backprop(theta, batch, bounds[j], bounds[j + 1], grad)

        return self._blocks(block, len(bounds) - 1, first, grid, theta)

    def block_evaluate(
        self, theta: np.ndarray, batch: Batch, bounds: Sequence[int], first: int, grid: BlockGrid
    ) -> BlockSums:
        """`evaluate` block by block, added along the block tree like `block_gradient`."""
        self._check(theta, batch)
        self._buffers_for(batch.rows)

        def block(j: int, empty: np.ndarray) -> tuple[Sums, float]:
            lo, hi = bounds[j], bounds[j + 1]
            *_, Z_out = self._forward(theta, batch.X1, lo, hi)
            loss, correct = self._loss(Z_out, batch.Y[:, lo:hi], lo, hi, batch.rows)
            return Sums(empty, loss, hi - lo, correct), 0.0

        return self._blocks(block, len(bounds) - 1, first, grid, np.empty(0, self.dtype))

    def _blocks(
        self,
        block: Callable[[int, np.ndarray], tuple[Sums, float]],
        count: int,
        first: int,
        grid: BlockGrid,
        like: np.ndarray,
    ) -> BlockSums:
        """block(j, grad buffer shaped like `like`) for each of the batch's `count` blocks,
        one contiguous range of blocks per thread, folded into the block tree as they come.
        Every node here is this call's own, so siblings are added in place and the right
        one's buffer serves a later block: a step allocates a few buffers, not one a block."""
        spare: list[np.ndarray] = []  # list.append and list.pop are atomic: shared by threads

        def join(left: Sums, right: Sums) -> Sums:
            left.grad += right.grad
            spare.append(right.grad)
            correct = None if left.correct is None else left.correct + right.correct
            return Sums(left.grad, left.loss + right.loss, left.rows + right.rows, correct)

        def blocks(lo: int, hi: int) -> tuple[dict[Node, Sums], float]:
            nodes: dict[Node, Sums] = {}
            forward_seconds = 0.0
            for j in range(lo, hi):
                sums, seconds = block(j, spare.pop() if spare else np.empty_like(like))
                add_node(nodes, (0, first + j), sums, grid, join)
                forward_seconds += seconds
            return nodes, forward_seconds

        parts = self._side_by_side(blocks, count, min(self.threads, count))
        total = BlockSums(forward_seconds=parts[0][1], grid=grid)
        for nodes, _ in parts:
            for node, sums in nodes.items():
                add_node(total.nodes, node, sums, grid, join)
        return total

    def _loss(
        self, Z_out: np.ndarray, Y: np.ndarray, lo: int, hi: int, m: int
    ) -> tuple[float, int | None]:
        """Loss sum and correct count of columns [lo, hi) of a batch of m; their dZ[L] lands
        in the delta buffer that back-propagation starts from."""
        L, sizes = self.layout.depth, self.layout.sizes
        dZ = self._delta[L % 2].reshape(max(sizes[1:]), m)[: sizes[L], lo:hi]
        return self._output.loss_and_delta(Z_out, Y, dZ), self._output.correct(Z_out, Y)

    def _backprop(
        self, theta: np.ndarray, batch: Batch, lo: int, hi: int, grad: np.ndarray
    ) -> tuple[Sums, float]:
        """Forward and backward on columns [lo, hi) of the batch, into the same columns of
        the buffers; the gradient sum goes into `grad`. Returns the sums over those columns
        and the forward pass's seconds."""
        m = batch.rows
        L = self.layout.depth
        sizes = self.layout.sizes
        started = time.perf_counter()
        *inputs, Z_out = self._forward(theta, batch.X1, lo, hi)
        forward_seconds = time.perf_counter() - started
        blocks = self.layout.blocks(theta)
        loss, correct = self._loss(Z_out, batch.Y[:, lo:hi], lo, hi, m)
        # dZ of layer l and dA of layer l-1 alternate between the two delta buffers
        delta = [buffer.reshape(max(sizes[1:]), m) for buffer in self._delta]
        dZ = delta[L % 2][: sizes[L], lo:hi]  # (n_L, hi - lo), as _loss left it
        grad_blocks = self.layout.blocks(grad)
        for l in range(L, 0, -1):
            A1_prev = inputs[l - 1]  # (n_{l-1} + 1, hi - lo)
            np.matmul(dZ, A1_prev.T, out=grad_blocks[l - 1])  # [dW_l | db_l]
            if l > 1:
                dA = delta[(l - 1) % 2][: sizes[l - 1], lo:hi]
                np.matmul(blocks[l - 1][:, :-1].T, dZ, out=dA)  # W_l^T dZ[l] = dA[l-1]
                self._derivative(A1_prev[:-1], dA)  # now dZ[l-1]
                dZ = dA
        return Sums(grad, loss, hi - lo, correct), forward_seconds

    def evaluate(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward only: loss sum and correct count (grad is empty)."""
        self._check(theta, batch)
        self._buffers_for(batch.rows)
        *_, Z_out = self._forward(theta, batch.X1)
        loss, correct = self._loss(Z_out, batch.Y, 0, batch.rows, batch.rows)
        return ShardSums(grad=np.empty(0, self.dtype), loss=loss, rows=batch.rows, correct=correct)

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output activations (n_L, m) for features X (n0, m): probabilities or values."""
        batch = Batch(X, np.empty((self.layout.sizes[-1], X.shape[1])), self.dtype)
        self._check(theta, batch)
        self._buffers_for(batch.rows)
        *_, Z_out = self._forward(theta, batch.X1)
        return self._output.predict(Z_out)
