"""Batch scoring: a worker reads its own rows of a table in slices and predicts each slice.

The scoring worker is a plain class, as ShardWorker is: `shardprop predict` runs it in-process
(`--workers 0`) or makes it a Ray actor. It owns a contiguous range of rows, the same split as
training's, and is asked for that range slice after slice, in order: only one slice of input
is ever in its memory, and a file is opened once and read on from where the last slice ended.
The inputs are encoded exactly as the served model encodes them (columns.inputs: encoded, then the
training mean and scale), and the forward pass is the network's own `predict`.
"""

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from threadpoolctl import ThreadpoolController, threadpool_limits

from shardprop.workers.data.columns import Column, inputs
from shardprop.workers.data.source import Source, one_line
from shardprop.workers.data.split import contiguous_ranges
from shardprop.workers.errors import DataError
from shardprop.workers.network.backprop import Architecture, Network
from shardprop.workers.network.chunks import PART_MIN_ROWS, blas_threads
from shardprop.workers.shard import placement

KINDS = ("probabilities", "labels", "values")
PREDICTION = "prediction"  # the output column of labels and of one regression value
PROBABILITY = "probability_"  # + the class: one output column per class probability


@dataclass(frozen=True)
class ScoringModel:
    """What scoring needs of a trained model, as plain arrays and names: shipped to workers."""

    arch: Architecture
    theta: np.ndarray  # the flat parameter vector, in the model's dtype
    columns: tuple[Column, ...]  # how each raw column becomes inputs
    mean: np.ndarray | None  # (n0, 1)
    scale: np.ndarray | None  # (n0, 1), zeros already replaced by 1
    classes: tuple | None  # classification: the original labels, in output order
    target: tuple[float, float] | None = None  # regression: (mean, std) the outputs are in

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @property
    def labels(self) -> tuple:
        """The class of each output unit (binary: the two classes), as the user's labels."""
        if self.classes is not None:
            return tuple(self.classes)
        return tuple(range(2 if self.arch.task == "binary" else self.arch.sizes[-1]))

    def default_kind(self) -> str:
        return "values" if self.arch.task == "regression" else "probabilities"

    def check_kind(self, kind: str) -> None:
        """DataError unless `kind` is one this model predicts."""
        if kind not in KINDS:
            raise DataError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
        regression = self.arch.task == "regression"
        if regression != (kind == "values"):
            fits = "values" if regression else "probabilities or labels"
            raise DataError(f"--kind {kind}: a {self.arch.task} model predicts {fits}")

    def output_fields(self, kind: str) -> list[pa.Field]:
        """The prediction columns of `kind`, in order."""
        if kind == "labels":
            return [pa.field(PREDICTION, pa.array(self.labels).type)]
        n_out = self.arch.sizes[-1]
        if kind == "values":
            names = [PREDICTION] if n_out == 1 else [f"{PREDICTION}_{i}" for i in range(n_out)]
        else:  # binary: the probability of the second class, as the served model returns it
            shown = self.labels[1:] if self.arch.task == "binary" else self.labels
            names = [f"{PROBABILITY}{label}" for label in shown]
        return [pa.field(name, pa.float64()) for name in names]


def prediction_columns(model: ScoringModel, A: np.ndarray, kind: str) -> list[pa.Array]:
    """The output activations A (n_L, m) as the columns of `kind`: probabilities, the
    original labels (null where a missing value made the row NaN), or values in the label's
    units."""
    if kind == "labels":
        index = (A[0] > 0.5).astype(np.int64) if len(A) == 1 else A.argmax(axis=0)
        unknown = np.isnan(A).any(axis=0)
        index = pa.array(index, mask=unknown) if unknown.any() else pa.array(index)
        return [pa.array(model.labels).take(index)]
    if kind == "values" and model.target is not None:  # trained on standardised targets
        A = A * model.target[1] + model.target[0]
    return [pa.array(row, pa.float64()) for row in A]


class RowStream:
    """Global rows of a Source, read in order slice after slice: a read that starts where the
    last one stopped goes on from the open file, so a range is read once, whatever the slices.
    Only the rows asked for are held, and the record batches the files give them in."""

    def __init__(self, source: Source, columns: Sequence[str], batch_rows: int):
        self.source = source
        self.columns = list(columns)
        self.batch_rows = batch_rows
        if source.schema is None:
            raise ValueError("the source has no schema; build it with open_source()")
        self.target = pa.schema(source.schema.field(name) for name in columns)
        self._at = -1  # the global row the open stream stands at (-1: none open)
        self._batches: Iterator[pa.Table] = iter(())
        self._rest: pa.Table | None = None  # rows read past the last slice: the next one's

    def read(self, start: int, stop: int) -> pa.Table:
        """Global rows [start, stop) of the columns, cast to the source's schema."""
        if self.source.synthetic is not None:  # drawn by blocks: any range at no extra cost
            return self.source.read(self.columns, start, stop)
        if start != self._at:
            self._batches, self._rest = self._stream(start), None
        pieces, left = [], stop - start
        while left > 0:
            piece = self._rest if self._rest is not None else next(self._batches, None)
            self._rest = None
            if piece is None:
                raise DataError(
                    f"expected rows [{start}, {stop}) of the data but it ends earlier; "
                    "did a file change after the predictions were planned?"
                )
            if piece.num_rows > left:  # the rest opens the next read
                piece, self._rest = piece.slice(0, left), piece.slice(left)
            pieces.append(piece)
            left -= piece.num_rows
        self._at = stop
        return pa.concat_tables([self.target.empty_table(), *pieces])

    def _stream(self, start: int) -> Iterator[pa.Table]:
        """Tables of rows from global row `start` to the end, file after file."""
        filesystem = self.source.filesystem()
        for file, lo, hi in self.source.spans(start, self.source.total_rows):
            yield from self._file_rows(filesystem, file, lo, hi)

    def _file_rows(self, filesystem: pafs.FileSystem, file: str, lo: int, hi: int):
        """Rows [lo, hi) of one file, batch by batch, each cast to the source's schema."""
        seen = 0
        try:
            for batch in BATCHES[self.source.format](
                filesystem, file, self.columns, self.target, lo, self.batch_rows
            ):
                offset, seen = seen, seen + batch.num_rows  # rows from lo
                keep = batch.slice(0, max(0, min(batch.num_rows, hi - lo - offset)))
                if keep.num_rows:
                    yield pa.Table.from_batches([keep]).select(self.columns).cast(self.target)
                if seen >= hi - lo:
                    return
        except (OSError, pa.ArrowInvalid) as error:
            raise DataError(f"{file}: cannot read its rows: {one_line(error)}") from None
        raise DataError(
            f"{file}: expected {hi} rows but it has {lo + seen}; "
            "did the file change after the predictions were planned?"
        )


def _skip(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The batches from the `rows`-th row on."""
    for batch in batches:
        if rows >= batch.num_rows:
            rows -= batch.num_rows
            continue
        yield batch.slice(rows)
        rows = 0


def _parquet_batches(
    filesystem: pafs.FileSystem,
    path: str,
    columns: list[str],
    target: pa.Schema,
    lo: int,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    """Record batches from row `lo` on, decoding from the row group that holds it."""
    with pq.ParquetFile(path, filesystem=filesystem) as parquet:
        metadata = parquet.metadata
        ends = list(
            itertools.accumulate(
                metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)
            )
        )
        first = next((g for g, end in enumerate(ends) if end > lo), len(ends))
        skipped = ends[first - 1] if first else 0
        # a row group at a time: asked for several, the reader buffers all of them at once
        batches = (
            batch
            for group in range(first, len(ends))
            for batch in parquet.iter_batches(batch_rows, row_groups=[group], columns=columns)
        )
        yield from _skip(batches, lo - skipped)


def _feather_batches(
    filesystem: pafs.FileSystem,
    path: str,
    columns: list[str],
    target: pa.Schema,
    lo: int,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    """Record batches from row `lo` on, decoding only `columns`. Read, not memory-mapped, as
    training reads: a mapped file rewritten under the worker would crash it."""
    with filesystem.open_input_file(path) as file:
        full = ipc.open_file(file).schema
        wanted = ipc.IpcReadOptions(included_fields=sorted(full.names.index(c) for c in columns))
        reader = ipc.open_file(file, options=wanted)
        every = (reader.get_batch(b) for b in range(reader.num_record_batches))
        yield from _skip(every, lo)


def _csv_batches(
    filesystem: pafs.FileSystem,
    path: str,
    columns: list[str],
    target: pa.Schema,
    lo: int,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    """Record batches from row `lo` on: CSV has no index, so streamed from the top."""
    convert = pacsv.ConvertOptions(
        column_types={field.name: field.type for field in target}, include_columns=columns
    )
    with filesystem.open_input_stream(path) as stream:
        yield from _skip(pacsv.open_csv(stream, convert_options=convert), lo)


BATCHES = {"parquet": _parquet_batches, "feather": _feather_batches, "csv": _csv_batches}


class Forward:
    """Network.predict over a slice's columns, cut into one contiguous part per thread, each
    part on single-threaded BLAS, as training's chunks run (workers/network/chunks.py): the
    elementwise passes use every core too, and no BLAS thread spin-waits between a chunk's
    small products, which costs most when the cores are shared."""

    def __init__(self, arch: Architecture, dtype: np.dtype, threads: int):
        self.networks = [Network(arch, dtype, threads=1) for _ in range(threads)]
        self.pool = ThreadPoolExecutor(threads, "scoring") if threads > 1 else None
        self.blas = ThreadpoolController()

    def __call__(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output activations (n_L, m) of the inputs X (n0, m)."""
        parts = min(len(self.networks), max(1, X.shape[1] // PART_MIN_ROWS))
        with self.blas.limit(limits=1, user_api="blas"):  # the caller's limit comes back after
            if self.pool is None or parts == 1:
                return self.networks[0].predict(theta, X)
            ranges = contiguous_ranges(X.shape[1], parts)
            done = [
                self.pool.submit(network.predict, theta, X[:, lo:hi])
                for network, (lo, hi) in zip(self.networks, ranges, strict=False)
            ]
            return np.concatenate([part.result() for part in done], axis=1)


class ScoringWorker:
    """Predictions for slices of rows [start, stop) of a source, with the columns to keep."""

    def __init__(
        self,
        rank: int,
        source: Source,
        model: ScoringModel,
        kind: str,
        keep: Sequence[str],
        start: int,
        stop: int,
        batch_rows: int,
        threads: int | None = None,
    ):
        """`threads`: the CPUs a Ray actor is granted (its process's BLAS is limited to them);
        None: in the caller's process, as many threads as its BLAS uses."""
        if threads is not None:
            threadpool_limits(limits=threads)  # this process's BLAS: one pool per CPU granted
        self.rank, self.start, self.stop = rank, start, stop
        self.model, self.kind, self.keep = model, kind, tuple(keep)
        self.forward = Forward(model.arch, model.theta.dtype, threads or blas_threads())
        read = list(dict.fromkeys([*model.features, *keep]))  # each column once
        self.stream = RowStream(source, read, batch_rows)
        kept = [source.schema.field(name) for name in keep]  # type: ignore[union-attr]
        self.schema = pa.schema([*model.output_fields(kind), *kept])

    def score(self, start: int, stop: int) -> tuple[pa.Table, dict[str, int]]:
        """The output rows of global rows [start, stop) (inside the worker's range): the
        predictions, then the kept columns; and the values never seen in training, per column."""
        if not self.start <= start <= stop <= self.stop:
            raise ValueError(f"rows [{start}, {stop}) are not in [{self.start}, {self.stop})")
        table = self.stream.read(start, stop)
        model = self.model
        X, unseen = inputs(model.columns, model.mean, model.scale, table)  # (n0, m)
        A = self.forward(model.theta, X)  # (n_L, m)
        predicted = prediction_columns(model, A, self.kind)
        kept = [table.column(name) for name in self.keep]
        return pa.Table.from_arrays([*predicted, *kept], schema=self.schema), unseen

    def where(self) -> dict:
        """Which node and process score these rows."""
        return placement(self.rank, self.start, self.stop)
