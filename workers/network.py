"""Forward and back-propagation of a fully-connected network on one shard of rows.

Samples are columns (DESIGN.md §1): A[0] = X is (n0, m). Every activation buffer carries an
extra last row of ones, so Z[l] = [W_l | b_l] @ [A[l-1]; 1] is one GEMM and so is
[dW_l | db_l] = dZ[l] @ [A[l-1]; 1]^T. Buffers live as long as the Network and are reused
every step: fresh multi-hundred-MB arrays cost more than the arithmetic on them.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info

from workers.activations import ACTIVATIONS, DERIVATIVES
from workers.losses import OUTPUTS
from workers.params import Layout

TASKS = tuple(OUTPUTS)
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


@dataclass
class ShardSums:
    """The shard contract: SUMS over the shard's rows, never means."""

    grad: np.ndarray  # gradient sum, flat, in the parameter layout
    loss: float  # loss sum
    rows: int
    correct: int | None  # correctly classified rows; None for regression
    seconds: float = 0.0  # the worker's compute time, to tell compute from communication
    forward_seconds: float = 0.0  # the forward pass's part of it
    # (seconds, forward_seconds) per rank, in rank order, when these are several shards' sums
    per_rank: tuple[tuple[float, float], ...] = ()

    def timings(self) -> tuple[tuple[float, float], ...]:
        return self.per_rank or ((self.seconds, self.forward_seconds),)

    def __iadd__(self, other: "ShardSums") -> "ShardSums":
        """Add the sums of `other`, which holds the later ranks; the gradient in place."""
        self.grad += other.grad
        self.loss += other.loss
        self.rows += other.rows
        if self.correct is not None:
            self.correct += other.correct
        self.per_rank = self.timings() + other.timings()
        self.seconds = max(self.seconds, other.seconds)
        self.forward_seconds = max(self.forward_seconds, other.forward_seconds)
        return self

    def copy(self) -> "ShardSums":
        """The same sums with a gradient of their own, to add others into."""
        return replace(self, grad=self.grad.copy(), per_rank=self.timings())

    def __add__(self, other: "ShardSums") -> "ShardSums":
        total = self.copy()
        total += other
        return total


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
        self._forward_seconds = 0.0  # of the last gradient call
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

    def gradient(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward and backward over the whole batch: the shard's sums."""
        self._check(theta, batch)
        m = batch.rows
        self._buffers_for(m)
        parts = min(self.threads, max(1, m // PART_MIN_ROWS))
        cuts = [m * i // parts for i in range(parts + 1)]
        grads = [np.empty_like(theta) for _ in range(parts)]
        if parts == 1:
            loss, correct = self._backprop(theta, batch, 0, m, grads[0])
            return ShardSums(grads[0], loss, m, correct, forward_seconds=self._forward_seconds)
        with self._blas.limit(limits=1, user_api="blas"):
            futures = [
                self._pool.submit(self._backprop, theta, batch, lo, hi, grad)
                for lo, hi, grad in zip(cuts[1:-1], cuts[2:], grads[1:], strict=True)
            ]
            first = self._backprop(theta, batch, 0, cuts[1], grads[0])
            results = [first, *(future.result() for future in futures)]
        grad = grads[0]
        for part in grads[1:]:
            grad += part  # in part order: the same bits every call
        loss = sum(part_loss for part_loss, _ in results)
        correct = None if first[1] is None else sum(c for _, c in results)
        return ShardSums(grad, loss, m, correct, forward_seconds=self._forward_seconds)

    def _backprop(
        self, theta: np.ndarray, batch: Batch, lo: int, hi: int, grad: np.ndarray
    ) -> tuple[float, int | None]:
        """Forward and backward on columns [lo, hi) of the batch, into the same columns of
        the buffers; writes the gradient sum into `grad`, returns loss sum and correct count."""
        m = batch.rows
        L = self.layout.depth
        sizes = self.layout.sizes
        started = time.perf_counter()
        *inputs, Z_out = self._forward(theta, batch.X1, lo, hi)
        if lo == 0:  # the parts run side by side: the first one's clock is the step's
            self._forward_seconds = time.perf_counter() - started
        blocks = self.layout.blocks(theta)
        Y = batch.Y[:, lo:hi]
        # dZ of layer l and dA of layer l-1 alternate between the two delta buffers
        delta = [buffer.reshape(max(sizes[1:]), m) for buffer in self._delta]
        dZ = delta[L % 2][: sizes[L], lo:hi]  # (n_L, hi - lo)
        loss = self._output.loss_and_delta(Z_out, Y, dZ)
        correct = self._output.correct(Z_out, Y)
        grad_blocks = self.layout.blocks(grad)
        for l in range(L, 0, -1):
            A1_prev = inputs[l - 1]  # (n_{l-1} + 1, hi - lo)
            np.matmul(dZ, A1_prev.T, out=grad_blocks[l - 1])  # [dW_l | db_l]
            if l > 1:
                dA = delta[(l - 1) % 2][: sizes[l - 1], lo:hi]
                np.matmul(blocks[l - 1][:, :-1].T, dZ, out=dA)  # W_l^T dZ[l] = dA[l-1]
                self._derivative(A1_prev[:-1], dA)  # now dZ[l-1]
                dZ = dA
        return loss, correct

    def evaluate(self, theta: np.ndarray, batch: Batch) -> ShardSums:
        """Forward only: loss sum and correct count (grad is empty)."""
        self._check(theta, batch)
        self._buffers_for(batch.rows)
        *_, Z_out = self._forward(theta, batch.X1)
        dZ = np.empty_like(Z_out)
        loss = self._output.loss_and_delta(Z_out, batch.Y, dZ)
        correct = self._output.correct(Z_out, batch.Y)
        return ShardSums(grad=np.empty(0, self.dtype), loss=loss, rows=batch.rows, correct=correct)

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output activations (n_L, m) for features X (n0, m): probabilities or values."""
        batch = Batch(X, np.empty((self.layout.sizes[-1], X.shape[1])), self.dtype)
        self._check(theta, batch)
        self._buffers_for(batch.rows)
        *_, Z_out = self._forward(theta, batch.X1)
        return self._output.predict(Z_out)
