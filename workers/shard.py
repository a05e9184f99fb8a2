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
from collections.abc import Sequence
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
    held_as,
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


def row_moments(
    X: Sequence[np.ndarray], rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """block_moments of X's selected columns, one row at a time: a whole (n, m) temporary
    would double the shard's memory."""
    parts = [block_moments(x[rows][None, :].astype(np.float64)) for x in X]
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
        self,
        validation_fraction: float = 0.0,
        seed: int = 0,
        missing: str = "error",
        dtype: str = "float64",
    ) -> ShardStats:
        """Read this shard's rows (once), set its validation rows aside, describe them.
        `missing`: data.missing; under "drop", rows with a missing value are left out.

        The rows come a piece at a time (a column of a Parquet row group, a CSV batch...)
        into one array per numeric feature, in the training `dtype` where it holds the
        values exactly (held_as): a worker never holds its rows as Arrow columns beside
        them, and prepare() frees each array as soon as it is in the batch."""
        started = time.perf_counter()
        m = self.stop - self.start
        numeric = [column.name for column in self._columns if column.kind == NUMERIC]
        kept = [column.name for column in self._columns if column.kind == CATEGORICAL]
        kept.append(self._label)
        types = self._source.schema_of([*numeric, *kept])
        self._features = [np.empty(m, held_as(types.field(name).type, dtype)) for name in numeric]
        features = dict(zip(numeric, self._features, strict=True))
        chunks: dict[str, list] = {name: [] for name in kept}
        names = [column.name for column in self._columns]
        for at, piece in self._source.pieces_of([*names, self._label], self.start, self.stop):
            for name in piece.column_names:
                if name in features:
                    values = numbers(piece.column(name))  # nulls become NaN
                    features[name][at : at + len(values)] = values
                else:  # copied: a slice of a piece can hold on to all of the piece's memory
                    chunks[name].append(pa.concat_arrays(piece.column(name).chunks))
        # the categories and the label: small beside the features, kept as Arrow columns
        column = {name: pa.chunked_array(chunks[name], types.field(name).type) for name in kept}
        self._categories = {name: plain(column[name]) for name in kept[:-1]}
        self._labels = column[self._label]
        del chunks, column
        if len(self._labels) != m:  # every row is in some piece, once
            raise DataError(f"read {len(self._labels)} rows of rows [{self.start}, {self.stop})")
        # the read's memory back to the system now, not at the allocator's own time: the
        # worker's peak is then the same from run to run, and what the plan says
        pa.default_memory_pool().release_unused()
        self._val = validation_mask(self.start, self.stop, validation_fraction, seed)
        self._validating = validation_fraction > 0
        stats = self._stats(missing)
        stats.read_seconds = time.perf_counter() - started
        return stats

    def _stats(self, mode: str) -> ShardStats:
        labels, m = self._labels, len(self._val)
        # per feature column, in order: missing (null, NaN) and infinite values, every row;
        # one column's flags at a time, a shard's worth of them would be a quarter of it
        self._keep = np.ones(m, bool)
        absent, infinite, first_bad, first_infinite = [], [], {}, {}
        features = iter(self._features)
        for column in self._columns:
            if column.kind == NUMERIC:
                values = next(features)
                bad, inf = np.isnan(values), np.isinf(values)
            else:
                bad, inf = missing(self._categories[column.name]), np.zeros(m, bool)
            absent.append(self._flagged(column.name, bad, first_bad))
            infinite.append(self._flagged(column.name, inf, first_infinite))
            if mode == "drop":
                self._keep &= ~bad
        kind = label_kind(labels)
        y = numbers(labels) if kind != "string" else None
        bad_labels = np.isnan(y) if y is not None else missing(labels)
        infinite_labels = np.isinf(y) if y is not None else np.zeros(m, bool)
        self._flagged(self._label, bad_labels, first_bad)
        self._flagged(self._label, infinite_labels, first_infinite)
        if mode == "drop":
            self._keep &= ~bad_labels
        train, val = self._keep & ~self._val, self._keep & self._val
        if self.grid:  # each block's columns among the training rows and the validation rows
            bounds = self.grid.bounds(self.start, self.stop)
            self._train_bounds = np.concatenate([[0], np.cumsum(train)])[bounds].tolist()
            self._val_bounds = np.concatenate([[0], np.cumsum(val)])[bounds].tolist()
            self._first_block = self.start // self.grid.block_rows
        moments = self._moments(self._features, train)
        if y is not None:  # the label's, for standardising a regression target
            label_moments = self._moments([y], train)
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
        return ShardStats(
            self.start,
            int(np.count_nonzero(train)),
            int(np.count_nonzero(val)),
            int(m - np.count_nonzero(self._keep)),
            moments,
            np.array(absent, np.int64),
            np.array(infinite, np.int64),
            int(np.count_nonzero(bad_labels)),
            int(np.count_nonzero(infinite_labels)),
            kind,
            fractional,
            np.unique(kept_labels)[: MAX_LABEL_VALUES + 1].tolist(),
            levels,
            too_many,
            first_bad=first_bad,
            first_infinite=first_infinite,
        )

    def _flagged(self, name: str, rows: np.ndarray, first: dict[str, str]) -> int:
        """How many rows are flagged; where the first one is, as the user finds it, goes
        into `first` under the column's name."""
        count = int(np.count_nonzero(rows))
        if count:
            first[name] = self._source.locate(self.start + int(rows.argmax()))
        return count

    def _moments(
        self, rows: Sequence[np.ndarray], train: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """block_moments of the training values of each of `rows` (one per feature): per
        block under the exact reduction, else the shard's as one part."""
        if not self.grid:
            return [row_moments(rows, train)]
        parts = []
        for lo, hi in pairwise(self.grid.bounds(self.start, self.stop)):
            kept = train[lo:hi]
            block = np.array([values[lo:hi][kept] for values in rows], np.float64)
            parts.append(block_moments(block.reshape(len(rows), np.count_nonzero(kept))))
        return parts

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
        them), and keep the batches; returns the training rows.

        The batches are written a feature at a time, each feature's array freed once it is
        in: the worker holds its batches and one feature more, never two copies of its rows."""
        train, val = self._keep & ~self._val, self._keep & self._val
        # exact: every block answers for the validation split, with no rows if need be
        validating = val.any() or (self.grid and self._validating)
        splits = [train, val] if validating else [train]
        n0 = width_of(columns)
        X1 = [np.empty((n0 + 1, np.count_nonzero(rows)), dtype) for rows in splits]
        Y = self._targets(arch, classes, target, dtype, splits)

        def inputs(values: np.ndarray, row: int, fill: float | None = None) -> np.ndarray:
            """Input `row`'s values, missing ones filled, standardised: in float64, as the
            served model computes them."""
            values = values.astype(np.float64)
            if fill is not None:
                values[np.isnan(values)] = fill
            if mean is not None and std is not None:
                values -= mean[row]
                values /= std[row]
            return values

        at = 0
        for column in columns:
            if column.kind == NUMERIC:
                values = self._features.pop(0)  # freed at the end of this turn
                for X, kept in zip(X1, splits, strict=True):
                    X[at] = inputs(values[kept], at, column.fill)
            else:
                for X, kept in zip(X1, splits, strict=True):
                    categories = self._categories[column.name].filter(pa.array(kept))
                    one_hot(column, categories, X[at : at + column.width])
                    for row in range(at, at + column.width):
                        X[row] = inputs(X[row], row)
            at += column.width
        for X in X1:
            X[n0] = 1
        self.batch = Batch.holding(X1[0], Y[0])
        self.network = Network(arch, dtype, threads=self.threads)
        if validating:
            self.val_batch = Batch.holding(X1[1], Y[1])
            self.val_network = Network(arch, dtype, threads=self.threads)
        del self._features, self._labels, self._categories
        return self.batch.rows

    def _targets(
        self,
        arch: Architecture,
        classes: list | None,
        target: tuple[float, float] | None,
        dtype: str,
        splits: list[np.ndarray],
    ) -> list[np.ndarray]:
        """Targets Y (n_L, rows) of each split's rows, in `dtype`: 0/1 for binary, one-hot
        for multiclass, values for regression (standardised by `target`)."""
        labels = self._labels.filter(pa.array(self._keep))
        if arch.task == "regression":
            if label_kind(labels) not in ("integer", "float", "bool"):
                raise DataError(f"label column is {labels.type}; regression needs numbers")
            values = numbers(labels)
            if target is not None:
                values = (values - target[0]) / target[1]
        else:
            if label_kind(labels) == "float":
                labels = pc.cast(labels, pa.float64())
            # classes are sorted
            values = np.searchsorted(np.asarray(classes), labels.to_numpy(zero_copy_only=False))
        Y = []
        for rows in splits:
            chosen = values[rows[self._keep]]
            if arch.task == "multiclass":
                one = np.zeros((len(classes), len(chosen)), dtype)  # (K, m)
                one[chosen, np.arange(len(chosen))] = 1
                Y.append(one)
            else:
                Y.append(chosen.reshape(1, -1).astype(dtype))
        return Y

    def renew(self, *args: Any) -> None:
        """This actor as a new ShardWorker of these arguments, nothing of its last run left:
        the next run of a process that keeps its workers (a sweep's trial process)."""
        self.__dict__.clear()
        self.__init__(*args)  # type: ignore[misc]

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
