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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from threadpoolctl import threadpool_info, threadpool_limits

from shardprop.workers.data.columns import (
    CATEGORICAL,
    NUMERIC,
    Column,
    level_counts,
    missing,
    numbers,
    one_hot,
    plain,
    width_of,
)
from shardprop.workers.data.source import Source
from shardprop.workers.data.split import validation_mask
from shardprop.workers.errors import DataError
from shardprop.workers.network.backprop import Architecture, Batch, Network
from shardprop.workers.reduction.blocktree import BlockGrid
from shardprop.workers.reduction.sums import BlockSums, ShardSums

MAX_LABEL_VALUES = 1000  # more distinct labels than this is not a classification task


@dataclass
class ShardStats:
    """What the coordinator needs to check the data, encode it and standardise it: parts
    that reduce across shards."""

    start: int  # global index of the shard's first row
    rows: int  # training rows kept (the statistics below are theirs)
    val_rows: int  # validation rows kept
    dropped: int  # rows left out for a missing value (data.missing: drop)
    # (count, mean, m2) per part over the training rows, missing values left out: per block
    # in block order under the exact reduction (the same bits for any split of the blocks),
    # else the shard's as one part. Entries: the numeric features in order, then the label
    # when it holds numbers.
    moments: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    missing: np.ndarray  # (features,) null or NaN values per feature column, every row
    infinite: np.ndarray  # (features,) inf values per feature column
    label_nulls: int  # null or NaN labels
    label_infinite: int  # inf labels
    label_kind: str  # "integer" | "float" | "bool" | "string"
    label_fractional: bool  # some float label has a fractional part: not a class label
    label_values: list  # distinct labels, sorted, at most MAX_LABEL_VALUES + 1
    # categorical column: level -> count over the training rows
    levels: dict[str, dict] = field(default_factory=dict)
    too_many_levels: list[str] = field(default_factory=list)  # over LEVELS_SENT distinct values
    read_seconds: float = 0.0  # reading and decoding the shard's rows
    # column: where its first missing value is, as the user finds it (row, file)
    first_bad: dict[str, str] = field(default_factory=dict)
    first_infinite: dict[str, str] = field(default_factory=dict)  # the same, for inf


def block_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of X (n, b): count of values that are not NaN, their mean, and their sum of
    squared deviations from it, by numpy's own sums (never BLAS, whose threads change bits)."""
    present = ~np.isnan(X)
    count = present.sum(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite data is refused after
        total = np.where(present, X, 0.0).sum(axis=1)
        mean = np.divide(total, count, out=np.zeros(len(X)), where=count > 0)
        m2 = np.square(np.where(present, X - mean[:, None], 0.0)).sum(axis=1)
    return count, mean, m2


def row_moments(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """block_moments of X's selected columns, one row at a time: a whole (n, m) temporary
    would double the shard's memory."""
    parts = [block_moments(x[rows][None, :]) for x in X]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return tuple(np.concatenate(values) for values in zip(*parts, strict=True))


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


def placement(rank: int, start: int, stop: int) -> dict:
    """Which node and process serve rows [start, stop) of rank `rank`."""
    record = {
        "rank": rank,
        "rows": [start, stop],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node_id": None,
    }
    ray = sys.modules.get("ray")  # loaded in a Ray worker; never imported by the math
    if ray is not None and ray.is_initialized():
        record["node_id"] = ray.get_runtime_context().get_node_id()
    return record


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
        columns: tuple[Column, ...],
        label: str,
        start: int,
        stop: int,
        threads: int | None = None,
        grid: BlockGrid | None = None,
    ):
        """`columns`: the features; `grid`: the exact reduction's blocks, of which rows
        [start, stop) are whole ones."""
        if threads is not None:
            threadpool_limits(limits=threads)  # this process's BLAS: one pool per CPU granted
        self.rank, self.start, self.stop, self.threads = rank, start, stop, threads
        self.grid = grid
        self._source, self._columns, self._label = source, columns, label
        self.batch: Batch | None = None
        self.network: Network | None = None
        self.val_batch: Batch | None = None
        self.val_network: Network | None = None

    def load(
        self, validation_fraction: float = 0.0, seed: int = 0, missing: str = "error"
    ) -> ShardStats:
        """Read this shard's rows (once), set its validation rows aside, describe them.
        `missing`: data.missing; under "drop", rows with a missing value are left out."""
        started = time.perf_counter()
        names = [column.name for column in self._columns]
        table = self._source.read([*names, self._label], self.start, self.stop)
        numeric = [column.name for column in self._columns if column.kind == NUMERIC]
        self._X = np.empty((len(numeric), table.num_rows), dtype=np.float64)  # (numeric, m)
        for i, name in enumerate(numeric):
            self._X[i] = numbers(table.column(name))  # nulls become NaN
        self._categories = {
            column.name: plain(table.column(column.name))
            for column in self._columns
            if column.kind == CATEGORICAL
        }
        self._labels = table.column(self._label)
        del table
        # the table's memory back to the system now, not at the allocator's own time: the
        # worker's peak is then the same from run to run, and what the plan says
        pa.default_memory_pool().release_unused()
        self._val = validation_mask(self.start, self.stop, validation_fraction, seed)
        self._validating = validation_fraction > 0
        stats = self._stats(missing)
        stats.read_seconds = time.perf_counter() - started
        return stats

    def _stats(self, mode: str) -> ShardStats:
        X, labels = self._X, self._labels
        m = len(self._val)
        # per feature column, in order: missing (null, NaN) and infinite values, every row
        absent, infinite = [], []
        numeric = iter(X)
        for column in self._columns:
            if column.kind == NUMERIC:
                values = next(numeric)
                absent.append(np.isnan(values))
                infinite.append(np.isinf(values))
            else:
                absent.append(missing(self._categories[column.name]))
                infinite.append(np.zeros(m, bool))
        kind = label_kind(labels)
        y = numbers(labels) if kind != "string" else None
        bad_labels = np.isnan(y) if y is not None else missing(labels)
        infinite_labels = np.isinf(y) if y is not None else np.zeros(m, bool)
        self._keep = np.ones(m, bool)
        if mode == "drop":
            for rows in absent:
                self._keep &= ~rows
            self._keep &= ~bad_labels
        train, val = self._keep & ~self._val, self._keep & self._val
        if self.grid:  # each block's columns among the training rows and the validation rows
            bounds = self.grid.bounds(self.start, self.stop)
            self._train_bounds = np.concatenate([[0], np.cumsum(train)])[bounds].tolist()
            self._val_bounds = np.concatenate([[0], np.cumsum(val)])[bounds].tolist()
            self._first_block = self.start // self.grid.block_rows
        moments = self._moments(X, train)
        if y is not None:  # the label's, for standardising a regression target
            label_moments = self._moments(y[None, :], train)
            moments = [
                tuple(np.concatenate(pair) for pair in zip(a, b, strict=True))
                for a, b in zip(moments, label_moments, strict=True)
            ]
        if y is not None and kind == "float":
            kept_labels = y[self._keep & ~bad_labels & ~infinite_labels]
            fractional = bool(np.any(kept_labels != np.round(kept_labels)))
        else:
            kept_labels = pc.drop_null(labels.filter(pa.array(self._keep))).to_numpy(
                zero_copy_only=False
            )
            fractional = False
        levels, too_many = {}, []
        for name, values in self._categories.items():
            levels[name], over = level_counts(values, train)
            if over:
                too_many.append(name)
        names = [column.name for column in self._columns]
        return ShardStats(
            self.start,
            int(np.count_nonzero(train)),
            int(np.count_nonzero(val)),
            int(m - np.count_nonzero(self._keep)),
            moments,
            np.array([np.count_nonzero(rows) for rows in absent], np.int64),
            np.array([np.count_nonzero(rows) for rows in infinite], np.int64),
            int(np.count_nonzero(bad_labels)),
            int(np.count_nonzero(infinite_labels)),
            kind,
            fractional,
            np.unique(kept_labels)[: MAX_LABEL_VALUES + 1].tolist(),
            levels,
            too_many,
            first_bad=self._first_rows([*names, self._label], [*absent, bad_labels]),
            first_infinite=self._first_rows([*names, self._label], [*infinite, infinite_labels]),
        )

    def _moments(
        self, X: np.ndarray, train: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """block_moments of X's training rows: per block under the exact reduction, else
        the shard's as one part."""
        if not self.grid:
            return [row_moments(X, train)]
        kept = X if train.all() else X[:, train]  # a copy only where rows are set aside
        return [block_moments(kept[:, lo:hi]) for lo, hi in pairwise(self._train_bounds)]

    def _first_rows(self, names: list[str], masks: list[np.ndarray]) -> dict[str, str]:
        """Column -> where its first flagged row is, as the user finds it."""
        return {
            name: self._source.locate(self.start + int(rows.argmax()))
            for name, rows in zip(names, masks, strict=True)
            if rows.any()
        }

    def prepare(
        self,
        arch: Architecture,
        dtype: str,
        columns: tuple[Column, ...],
        classes: list | None,
        mean: np.ndarray | None,
        std: np.ndarray | None,
        target: tuple[float, float] | None = None,
    ) -> int:
        """Encode the kept rows (`columns` with their levels and fills), standardise them,
        encode the labels for the task (regression: `target` = (mean, std) standardises
        them), and keep the batches; returns the training rows."""
        keep = self._keep
        X = self._inputs(columns, keep)
        Y, val = self._encode(arch, classes, target), self._val[keep]
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
        del self._X, self._labels, self._categories
        return self.batch.rows

    def _inputs(self, columns: tuple[Column, ...], keep: np.ndarray) -> np.ndarray:
        """The input rows (n0, kept rows): numbers as read (missing ones filled where the
        column has a fill), categories one-hot. Numbers alone are used in place."""
        numeric = [column for column in columns if column.kind == NUMERIC]
        for values, column in zip(self._X, numeric, strict=True):
            if column.fill is not None:
                values[np.isnan(values)] = column.fill
        if len(numeric) == len(columns) and keep.all():
            return self._X
        X = np.empty((width_of(columns), int(np.count_nonzero(keep))), np.float64)
        rows, row = iter(self._X), 0
        kept = pa.array(keep)
        for column in columns:
            if column.kind == NUMERIC:
                X[row] = next(rows)[keep]
            else:
                one_hot(
                    column, self._categories[column.name].filter(kept), X[row : row + column.width]
                )
            row += column.width
        return X

    def _encode(
        self, arch: Architecture, classes: list | None, target: tuple[float, float] | None
    ) -> np.ndarray:
        """Targets Y (n_L, m) of the kept rows: 0/1 for binary, one-hot for multiclass,
        values for regression (standardised by `target`)."""
        labels = self._labels.filter(pa.array(self._keep))
        if arch.task == "regression":
            if label_kind(labels) not in ("integer", "float", "bool"):
                raise DataError(f"label column is {labels.type}; regression needs numbers")
            y = numbers(labels)
            if target is not None:
                y = (y - target[0]) / target[1]
            return y.reshape(1, -1)
        if label_kind(labels) == "float":
            labels = pc.cast(labels, pa.float64())
        values = labels.to_numpy(zero_copy_only=False)
        index = np.searchsorted(np.asarray(classes), values)  # classes are sorted
        if arch.task == "binary":
            return index.reshape(1, -1).astype(np.float64)
        return np.eye(len(classes))[index].T  # (K, m)

    def call(self, method: str, args: tuple) -> Any:
        """`method(*args)`: the one entry point of the group's compiled graph."""
        return getattr(self, method)(*args)

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
        start = time.perf_counter()
        sums = self._evaluate(theta, split)
        sums.seconds = sums.forward_seconds = time.perf_counter() - start  # forward only
        return sums

    def _evaluate(self, theta: np.ndarray, split: str) -> ShardSums | BlockSums:
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

    def scores(self, theta: np.ndarray, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Every row's predicted P(positive) and its 0/1 label, in row order (binary): what a
        ROC AUC over all rows needs."""
        network, batch = (
            (self.val_network, self.val_batch)
            if split == "validation"
            else (self.network, self.batch)
        )
        if batch is None:
            return np.empty(0), np.empty(0)
        return network.predict_batch(theta, batch)[0], batch.Y[0].copy()

    def where(self) -> dict:
        """Which node and process hold this shard, for the run's records."""
        record = placement(self.rank, self.start, self.stop) | {
            "node_ip": None,
            "code": os.path.dirname(os.path.dirname(__file__)),  # where workers/ came from
            "blas": blas_build(),
        }
        ray = sys.modules.get("ray")  # loaded in a Ray worker; never imported by the math
        if ray is not None and ray.is_initialized():
            record["node_ip"] = ray.util.get_node_ip_address()
        return record
