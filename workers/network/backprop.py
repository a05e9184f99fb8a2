"""Forward and back-propagation of a fully-connected network on a shard's columns.

Samples are columns (docs/architecture.md): A[0] = X is (n0, m). Every activation buffer
carries an extra last row of ones, so Z[l] = [W_l | b_l] [A[l-1]; 1] is one GEMM and so is
[dW_l | db_l] = dZ[l] [A[l-1]; 1]^T. Buffers live as long as the Network and are reused every
step: fresh arrays the size of a shard cost more than the arithmetic on them. How the columns
are cut into chunks and spread over threads is chunks.py's job.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from shardprop.workers.network.activations import ACTIVATIONS, DERIVATIVES
from shardprop.workers.network.chunks import ChunkRunner, blas_threads, chunk_columns
from shardprop.workers.network.losses import OUTPUTS
from shardprop.workers.network.params import Layout
from shardprop.workers.reduction.blocktree import BlockGrid
from shardprop.workers.reduction.sums import BlockSums, ShardSums, Sums

TASKS = tuple(OUTPUTS)


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

    @classmethod
    def holding(cls, X1: np.ndarray, Y: np.ndarray) -> "Batch":
        """A batch of X1 (n0 + 1, m), its last row ones already, and Y (n_L, m) in the same
        dtype, held as they are: a worker builds them in place, and a copy would double
        its rows' memory."""
        if X1.dtype != Y.dtype or Y.ndim != 2 or Y.shape[1] != X1.shape[1]:
            raise ValueError(f"Y {Y.shape} {Y.dtype} does not go with X1 {X1.shape} {X1.dtype}")
        batch = cls.__new__(cls)
        batch.X1, batch.Y = X1, Y
        return batch

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
            A1 = np.empty((n + 1, width), dtype=dtype)  # (n_l + 1, width)
            A1[n] = 1
            self.A1.append(A1)
        self.Z_out = np.empty((sizes[-1], width), dtype=dtype)  # (n_L, width)
        self.delta = [np.empty((max(sizes[1:]), width), dtype=dtype) for _ in range(2)]

    def delta_of(self, l: int, n: int, w: int) -> np.ndarray:
        """dZ[l] (or dA[l]) of n units over the first w columns: layers alternate buffers."""
        return self.delta[l % 2][:n, :w]


class Network:
    """One architecture in one dtype, with a chunk's buffers per thread kept between calls."""

    def __init__(
        self, arch: Architecture, dtype: np.dtype | str = np.float64, threads: int | None = None
    ):
        """`threads` to run the columns on; None: as many as BLAS uses now."""
        self.arch = arch
        self.layout = arch.layout
        self.dtype = np.dtype(dtype)
        self._activate = ACTIVATIONS[arch.activation]
        self._derivative = DERIVATIVES[arch.activation]
        self._output = OUTPUTS[arch.task]
        self.runner = ChunkRunner(
            partial(Buffers, self.layout.sizes, dtype=self.dtype),
            chunk_columns(self.layout.sizes, self.dtype),
            blas_threads() if threads is None else threads,
        )

    @property
    def chunk(self) -> int:
        """Columns a thread runs through forward and backward at a time."""
        return self.runner.chunk

    @chunk.setter
    def chunk(self, columns: int) -> None:
        self.runner.chunk = columns

    @property
    def buffers(self) -> list[Buffers]:
        """Each thread's buffers, kept between calls and only ever grown."""
        return self.runner.buffers

    def gradient(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward and backward over the whole batch: the shard's sums."""
        self._check(theta, batch)
        chunk = partial(self._chunk_gradient, theta, batch)
        total, forward_seconds = self.runner.columns(chunk, batch.rows, theta)
        return ShardSums(
            total.grad,
            total.loss,
            total.rows,
            total.correct,
            tallies=total.tallies,
            forward_seconds=forward_seconds,
        )

    def evaluate(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward only: loss sum, correct count and tallies (grad is empty)."""
        self._check(theta, batch)
        empty = np.empty(0, self.dtype)
        chunk = partial(self._chunk_evaluate, theta, batch)
        total, _ = self.runner.columns(chunk, batch.rows, empty)
        return ShardSums(total.grad, total.loss, total.rows, total.correct, tallies=total.tallies)

    def block_gradient(
        self, theta: np.ndarray, batch: Batch, bounds: Sequence[int], first: int, grid: BlockGrid
    ) -> BlockSums:
        """The exact reduction's sums (docs/exactness.md): block j of the batch, columns
        [bounds[j], bounds[j + 1]), is the dataset's block first + j. Each block is run on
        its own, in chunks that depend on its bounds alone, on single-threaded BLAS whatever
        the thread count: its bits are the same in any worker. The blocks are added up into
        the whole subtrees they make."""
        self._check(theta, batch)
        chunk = partial(self._chunk_gradient, theta, batch)
        return self.runner.blocks(chunk, bounds, first, grid, theta)

    def block_evaluate(
        self, theta: np.ndarray, batch: Batch, bounds: Sequence[int], first: int, grid: BlockGrid
    ) -> BlockSums:
        """`evaluate` block by block, added along the block tree like `block_gradient`."""
        self._check(theta, batch)
        empty = np.empty(0, self.dtype)
        chunk = partial(self._chunk_evaluate, theta, batch)
        return self.runner.blocks(chunk, bounds, first, grid, empty)

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output activations (n_L, m) for features X (n0, m): probabilities or values."""
        Y = np.empty((self.layout.sizes[-1], X.shape[1]))
        return self.predict_batch(theta, Batch(X, Y, self.dtype))

    def predict_batch(self, theta: np.ndarray, batch: Batch) -> np.ndarray:
        """Output activations (n_L, m) for a batch's rows, chunk by chunk, without copying it."""
        self._check(theta, batch)
        m, chunk = batch.rows, self.chunk
        A_out = np.empty((self.layout.sizes[-1], m), self.dtype)  # (n_L, m)
        buffers = self.runner.scratch(1, max(1, min(chunk, m)))[0]
        for lo in range(0, m, chunk):
            *_, Z_out = self._forward(theta, batch.X1[:, lo : lo + chunk], buffers)
            A_out[:, lo : lo + chunk] = self._output.predict(Z_out)
        return A_out

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

    # The math on one chunk of w columns, in the buffers' first w columns.

    def _forward(self, theta: np.ndarray, X1: np.ndarray, buffers: Buffers) -> list[np.ndarray]:
        """Z[l] = [W_l | b_l] [A[l-1]; 1], A[l] = g(Z[l]) for the columns X1 ((n0 + 1, w));
        returns views of [A[0]; 1], ..., [A[L-1]; 1], Z[L]."""
        w = X1.shape[1]
        inputs = [X1] + [A1[:, :w] for A1 in buffers.A1]  # [A[l]; 1]
        outputs = [A1[:-1] for A1 in inputs[1:]] + [buffers.Z_out[:, :w]]  # Z[l], then A[l]
        for l, block in enumerate(self.layout.blocks(theta)):
            np.matmul(block, inputs[l], out=outputs[l])
            if l < self.layout.depth - 1:
                self._activate(outputs[l])
        return [*inputs, outputs[-1]]

    def _backward(
        self, theta: np.ndarray, inputs: list[np.ndarray], buffers: Buffers, grad: np.ndarray
    ) -> None:
        """From dZ[L], which `_loss` left in the buffers, down to layer 1: the gradient sum
        [dW_l | db_l] = dZ[l] [A[l-1]; 1]^T into `grad`, then dA[l-1] = W_l^T dZ[l] and
        dZ[l-1] = dA[l-1] g'(Z[l-1])."""
        L, sizes = self.layout.depth, self.layout.sizes
        w = inputs[0].shape[1]
        blocks, grad_blocks = self.layout.blocks(theta), self.layout.blocks(grad)
        dZ = buffers.delta_of(L, sizes[L], w)  # (n_L, w)
        for l in range(L, 0, -1):
            A1_prev = inputs[l - 1]  # (n_{l-1} + 1, w)
            np.matmul(dZ, A1_prev.T, out=grad_blocks[l - 1])  # [dW_l | db_l]
            if l > 1:
                dA = buffers.delta_of(l - 1, sizes[l - 1], w)
                np.matmul(blocks[l - 1][:, :-1].T, dZ, out=dA)  # W_l^T dZ[l] = dA[l-1]
                self._derivative(A1_prev[:-1], dA)  # now dZ[l-1]
                dZ = dA

    def _loss(
        self, Z_out: np.ndarray, Y: np.ndarray, buffers: Buffers
    ) -> tuple[float, int | None, np.ndarray]:
        """Loss sum, correct count and metric tallies of the chunk; dZ[L] = A[L] - Y goes
        where `_backward` starts."""
        L = self.layout.depth
        dZ = buffers.delta_of(L, self.layout.sizes[L], Z_out.shape[1])
        loss = self._output.loss_and_delta(Z_out, Y, dZ)
        tallies = self._output.tallies(Z_out, Y)
        return loss, self._output.correct(tallies), tallies

    def _chunk_gradient(
        self, theta: np.ndarray, batch: Batch, lo: int, hi: int, buffers: Buffers, grad: np.ndarray
    ) -> tuple[Sums, float]:
        """Forward and backward on columns [lo, hi) of the batch, the gradient sum into
        `grad`; returns the sums and the forward pass's seconds."""
        started = time.perf_counter()
        *inputs, Z_out = self._forward(theta, batch.X1[:, lo:hi], buffers)
        forward_seconds = time.perf_counter() - started
        loss, correct, tallies = self._loss(Z_out, batch.Y[:, lo:hi], buffers)
        self._backward(theta, inputs, buffers, grad)
        return Sums(grad, loss, hi - lo, correct, tallies=tallies), forward_seconds

    def _chunk_evaluate(
        self, theta: np.ndarray, batch: Batch, lo: int, hi: int, buffers: Buffers, empty: np.ndarray
    ) -> tuple[Sums, float]:
        """Loss sum, correct count and tallies of columns [lo, hi); no gradient."""
        *_, Z_out = self._forward(theta, batch.X1[:, lo:hi], buffers)
        loss, correct, tallies = self._loss(Z_out, batch.Y[:, lo:hi], buffers)
        return Sums(empty, loss, hi - lo, correct, tallies=tallies), 0.0
