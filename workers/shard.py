"""The shard worker: owns one contiguous range of rows and serves its sums.

A plain class: the worker group (`shardprop.service.cluster.group`) runs it in-process
(`--workers 0`) or makes it a Ray actor.
It reads its own rows (the coordinator never holds the data), reports statistics for the
checks and the standardisation, then keeps the prepared batch and the network's buffers in
memory for every step.
"""

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from threadpoolctl import threadpool_info, threadpool_limits

from shardprop.workers.data.source import Source
from shardprop.workers.data.split import validation_mask
from shardprop.workers.errors import DataError
from shardprop.workers.network.backprop import Architecture, Batch, Network
from shardprop.workers.reduction.blocktree import BlockGrid
from shardprop.workers.reduction.sums import BlockSums, ShardSums

MAX_LABEL_VALUES = 1000  # more distinct labels than this is not a classification task


@dataclass
class ShardStats:
    """What the coordinator needs to check the data and standardise it: reducible parts."""

    start: int  # global index of the shard's first row
    rows: int  # training rows (the statistics below are theirs)
    val_rows: int  # validation rows
    mean: np.ndarray  # (n0,) per-feature mean of this shard
    m2: np.ndarray  # (n0,) per-feature sum of squared deviations from that mean
    nonfinite: np.ndarray  # (n0,) NaN, inf or null values per feature
    label_nulls: int  # null or NaN labels
    label_kind: str  # "integer" | "float" | "bool" | "string"
    label_fractional: bool  # some float label has a fractional part: not a class label
    label_values: list  # distinct labels, sorted, at most MAX_LABEL_VALUES + 1
    read_seconds: float = 0.0  # reading and decoding the shard's rows
    # (rows, mean, m2) of each block's training rows, in block order: the exact reduction's
    # statistics, the same bits for any split of the blocks
    blocks: list[tuple[int, np.ndarray, np.ndarray]] | None = None
    # column: where its first NaN, inf or null value is, as the user finds it (row, file)
    first_bad: dict[str, str] = field(default_factory=dict)


def block_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and sum of squared deviations of a block's columns."""
    if not X.shape[1]:
        return np.zeros(X.shape[0]), np.zeros(X.shape[0])
    mean = X.mean(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite data is refused after
        return mean, np.square(X - mean[:, None]).sum(axis=1)


def blas_build() -> str:
    """The BLAS this process runs, its kernel and its threads: the exact reduction gives the
    same bits across nodes that run the same build and kernel (it runs each block on one
    thread); rank order's bits also depend on the thread count."""
    return "; ".join(
        f"{i['internal_api']} {i['version']} {i.get('architecture') or ''} "
        f"{i.get('threading_layer') or ''}, {i['num_threads']} thread(s)"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    )


def label_kind(column: pa.ChunkedArray) -> str:
    kind = column.type
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_integer(kind):
        return "integer"
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "float"
    return "string"


class ShardWorker:
    """Rows [start, stop) of a source, as one batch, with a network to run on them."""

    def __init__(
        self,
        rank: int,
        source: Source,
        features: tuple[str, ...],
        label: str,
        start: int,
        stop: int,
        threads: int | None = None,
        grid: BlockGrid | None = None,
    ):
        """`grid`: the exact reduction's blocks, of which rows [start, stop) are whole ones."""
        if threads is not None:
            threadpool_limits(limits=threads)  # this process's BLAS: one pool per CPU granted
        self.rank, self.start, self.stop, self.threads = rank, start, stop, threads
        self.grid = grid
        self._source, self._features, self._label = source, features, label
        self.batch: Batch | None = None
        self.network: Network | None = None
        self.val_batch: Batch | None = None
        self.val_network: Network | None = None

    def load(self, validation_fraction: float = 0.0, seed: int = 0) -> ShardStats:
        """Read this shard's rows (once), set its validation rows aside, describe them."""
        started = time.perf_counter()
        features, label = self._features, self._label
        self._val = validation_mask(self.start, self.stop, validation_fraction, seed)
        self._validating = validation_fraction > 0
        if self.grid:  # each block's columns among the training rows and the validation rows
            bounds = self.grid.bounds(self.start, self.stop)
            before = np.concatenate([[0], np.cumsum(self._val)])[bounds]
            self._val_bounds = before.tolist()
            self._train_bounds = (np.asarray(bounds) - before).tolist()
            self._first_block = self.start // self.grid.block_rows
        table = self._source.read([*features, label], self.start, self.stop)
        m = table.num_rows
        self._X = np.empty((len(features), m), dtype=np.float64)  # (n0, m)
        for i, name in enumerate(features):
            # nulls become NaN: counted by stats() and refused before training
            self._X[i] = pc.cast(table.column(name), pa.float64()).to_numpy()
        self._labels = table.column(label)
        stats = self._stats()
        stats.read_seconds = time.perf_counter() - started
        return stats

    def _stats(self) -> ShardStats:
        X, labels = self._X, self._labels
        m = X.shape[1]
        bad = ~np.isfinite(X)  # (n0, m): checked on every row, validation ones too
        nonfinite = np.count_nonzero(bad, axis=1)
        first = np.where(nonfinite > 0, bad.argmax(axis=1), -1) if m else np.full(len(X), -1)
        train = X[:, ~self._val] if self._val.any() else X  # standardise by training rows only
        mean = train.mean(axis=1) if train.shape[1] else np.zeros(X.shape[0])
        # row by row: a whole (n0, m) temporary would double the shard's memory
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite data is refused after
            m2 = np.array([np.dot(r - mu, r - mu) for r, mu in zip(train, mean, strict=True)])
        blocks = None
        if self.grid:  # numpy's own sums, never BLAS (whose threads change the bits)
            blocks = [
                (hi - lo, *block_moments(train[:, lo:hi]))
                for lo, hi in pairwise(self._train_bounds)
            ]
        kind = label_kind(labels)
        if kind == "float":
            values = pc.cast(labels, pa.float64()).to_numpy()  # nulls become NaN
            bad_labels = ~np.isfinite(values)
            values = values[~bad_labels]
            fractional = bool(np.any(values != np.round(values)))
        else:
            bad_labels = labels.is_null().to_numpy()
            values = pc.drop_null(labels).to_numpy(zero_copy_only=False)
            fractional = False
        nulls = int(np.count_nonzero(bad_labels))
        distinct = np.unique(values)[: MAX_LABEL_VALUES + 1].tolist()
        bad_rows = dict(zip(self._features, first.tolist(), strict=True))
        bad_rows[self._label] = int(bad_labels.argmax()) if nulls else -1
        first_bad = {
            column: self._source.locate(self.start + row)
            for column, row in bad_rows.items()
            if row >= 0
        }
        val_rows = int(np.count_nonzero(self._val))
        return ShardStats(
            self.start,
            m - val_rows,
            val_rows,
            mean,
            m2,
            nonfinite,
            nulls,
            kind,
            fractional,
            distinct,
            blocks=blocks,
            first_bad=first_bad,
        )

    def prepare(
        self,
        arch: Architecture,
        dtype: str,
        classes: list | None,
        mean: np.ndarray | None,
        std: np.ndarray | None,
    ) -> int:
        """Standardise, encode the labels for the task, and keep the batches; returns the
        training rows."""
        X, Y, val = self._X, self._encode(arch, classes), self._val
        if mean is not None and std is not None:
            X -= mean[:, None]
            X /= std[:, None]
        # exact: every block answers for the validation split, with no rows if need be
        if val.any() or (self.grid and self._validating):
            self.val_batch = Batch(X[:, val], Y[:, val], dtype)
            self.val_network = Network(arch, dtype, threads=self.threads)
            X, Y = X[:, ~val], Y[:, ~val]
        self.batch = Batch(X, Y, dtype)
        self.network = Network(arch, dtype, threads=self.threads)
        del self._X, self._labels
        return self.batch.rows

    def _encode(self, arch: Architecture, classes: list | None) -> np.ndarray:
        """Targets Y (n_L, m): 0/1 for binary, one-hot for multiclass, values for regression."""
        labels = self._labels
        if arch.task == "regression":
            if label_kind(labels) not in ("integer", "float", "bool"):
                raise DataError(f"label column is {labels.type}; regression needs numbers")
            return pc.cast(labels, pa.float64()).to_numpy().reshape(1, -1)
        if label_kind(labels) == "float":
            labels = pc.cast(labels, pa.float64())
        values = labels.to_numpy(zero_copy_only=False)
        index = np.searchsorted(np.asarray(classes), values)  # classes are sorted
        if arch.task == "binary":
            return index.reshape(1, -1).astype(np.float64)
        return np.eye(len(classes))[index].T  # (K, m)

    def gradient(self, theta: np.ndarray) -> ShardSums | BlockSums:
        start = time.perf_counter()
        if self.grid:
            sums = self.network.block_gradient(
                theta, self.batch, self._train_bounds, self._first_block, self.grid
            )
        else:
            sums = self.network.gradient(theta, self.batch)
        sums.seconds = time.perf_counter() - start
        return sums

    def evaluate(self, theta: np.ndarray, split: str = "train") -> ShardSums | BlockSums:
        """Loss sum and correct count on the training or the validation rows."""
        if self.grid:
            network, batch, bounds = (
                (self.val_network, self.val_batch, self._val_bounds)
                if split == "validation"
                else (self.network, self.batch, self._train_bounds)
            )
            return network.block_evaluate(theta, batch, bounds, self._first_block, self.grid)
        if split == "validation":
            if self.val_batch is None:  # no validation row landed in this shard
                correct = None if self.network.arch.task == "regression" else 0
                return ShardSums(np.empty(0, theta.dtype), 0.0, 0, correct)
            return self.val_network.evaluate(theta, self.val_batch)
        return self.network.evaluate(theta, self.batch)

    def where(self) -> dict:
        """Which node and process hold this shard, for the run's records."""
        record = {
            "rank": self.rank,
            "rows": [self.start, self.stop],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": None,
            "node_ip": None,
            "code": os.path.dirname(os.path.dirname(__file__)),  # where workers/ came from
            "blas": blas_build(),
        }
        ray = sys.modules.get("ray")  # loaded in a Ray worker; never imported by the math
        if ray is not None and ray.is_initialized():
            record["node_id"] = ray.get_runtime_context().get_node_id()
            record["node_ip"] = ray.util.get_node_ip_address()
        return record
