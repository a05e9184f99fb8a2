"""A table described by its metadata, and the reading of one row range of it.

The coordinator builds a Source from file footers alone (service/data/plan.py) and ships it, small
and picklable, to every worker; each worker then reads only its own rows [start, stop) and
opens only the files, and for Parquet only the row groups, that hold them. Global row order is
the order of `files`, then the order of rows inside each file.

Remote files are reached through a filesystem that each process builds for itself from a URI
and FilesystemOptions (never shipped as an object: a client holds sockets and credentials).
"""

import datetime
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from shardprop.workers.data.synthetic import BLOCK_ROWS, SyntheticSpec, generate
from shardprop.workers.data.synthetic import schema as synthetic_schema
from shardprop.workers.errors import DataError

FORMATS = ("parquet", "csv", "feather", "synthetic", "table")
ERROR_CHARS = 300  # pyarrow's messages can list dozens of paths tried (libjvm): keep the gist
GCS_RETRY_SECONDS = 30.0  # GCS's own default retries for 15 minutes before it reports anything
SYNTHETIC_PIECE_ROWS = 16 * BLOCK_ROWS  # whole blocks: each is drawn whole anyway


def one_line(error: BaseException) -> str:
    """An error's message as one short line: the CLI prints user errors on a single line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class FilesystemOptions:
    """data.filesystem: where an object store answers and how to sign in; None = not set.

    Unset options fall back to pyarrow's defaults and the process's environment
    (AWS_REGION, ...). Credentials are deliberately not options: every process reads its own
    (AWS_ACCESS_KEY_ID, ...), so no secret travels inside a pickled Source.
    """

    endpoint: str | None = None  # scheme://host[:port] of an S3 (or GCS) compatible server
    region: str | None = None
    anonymous: bool | None = None

    @property
    def is_set(self) -> bool:
        return any(value is not None for value in (self.endpoint, self.region, self.anonymous))


def open_filesystem(uri: str, options: FilesystemOptions) -> tuple[pafs.FileSystem, str]:
    """The filesystem a URI names, built from the URI and the options alone, and the path in it.

    s3:// is always built explicitly, so that the options (and an endpoint without TLS) apply;
    gs:// too when options are set; everything else (hdfs://, file://, ...) goes through
    FileSystem.from_uri, whose options live in the URI's query. gs:// retries are bounded
    (GCS_RETRY_SECONDS), so that an unreachable store fails instead of seeming to hang.
    """
    scheme = uri.partition("://")[0].lower()
    named = uri
    try:
        if scheme == "s3":
            return pafs.S3FileSystem(**_s3_arguments(uri, options)), _bucket_path(uri)
        if scheme in ("gs", "gcs"):
            if options.is_set:
                return pafs.GcsFileSystem(**_gcs_arguments(uri, options)), _bucket_path(uri)
            if "retry_limit_seconds=" not in uri:
                uri += f"{'&' if '?' in uri else '?'}retry_limit_seconds={GCS_RETRY_SECONDS}"
        elif options.is_set and scheme != "file":
            raise DataError(
                f"data.filesystem: {scheme}:// takes no endpoint/region/anonymous options "
                "(they apply to s3:// and gs://); leave data.filesystem unset"
            )
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as error:
        raise DataError(f"data.path: cannot open {named}: {one_line(error)}") from None


def _s3_arguments(uri: str, options: FilesystemOptions) -> dict:
    parts = urlsplit(uri)
    if parts.query:
        raise ValueError("put S3 options in data.filesystem, not in the URI's query")
    credentials, _, _ = parts.netloc.rpartition("@")  # s3://KEY:SECRET@bucket, as pyarrow reads it
    arguments: dict = {}
    if credentials:
        key, _, secret = credentials.partition(":")
        arguments |= {"access_key": key, "secret_key": secret}
    if options.endpoint is not None:
        arguments |= _endpoint_arguments(options.endpoint)
    if options.region is not None:
        arguments["region"] = options.region
    if options.anonymous is not None:
        arguments["anonymous"] = options.anonymous
    return arguments


def _gcs_arguments(uri: str, options: FilesystemOptions) -> dict:
    if urlsplit(uri).query:
        raise ValueError("filesystem options in the URI and in data.filesystem; use one place")
    if options.region is not None:
        raise DataError("data.filesystem.region: gs:// buckets have no region option; unset it")
    arguments: dict = {"retry_time_limit": datetime.timedelta(seconds=GCS_RETRY_SECONDS)}
    if options.endpoint is not None:
        arguments |= _endpoint_arguments(options.endpoint)
    if options.anonymous is not None:
        arguments["anonymous"] = options.anonymous
    return arguments


def _endpoint_arguments(endpoint: str) -> dict:
    """endpoint_override and scheme from http(s)://host[:port]; a bare host:port keeps https."""
    scheme, separator, address = endpoint.partition("://")
    address = address.rstrip("/")
    if not separator:
        return {"endpoint_override": endpoint}
    if scheme.lower() not in ("http", "https") or not address or "/" in address:
        raise DataError(
            f"data.filesystem.endpoint: expected http://host:port or https://host:port, "
            f"got {endpoint!r}"
        )
    return {"scheme": scheme.lower(), "endpoint_override": address}


def _bucket_path(uri: str) -> str:
    """bucket/key of s3://[credentials@]bucket/key, as pyarrow's object stores name files."""
    parts = urlsplit(uri)
    return (parts.netloc.rpartition("@")[2] + parts.path).rstrip("/")


@dataclass(frozen=True)
class Source:
    """Files in one format (or a synthetic spec), their row counts and their unified schema.

    `files` are paths inside the filesystem that `filesystem_uri` and `filesystem_options`
    name (None: the local filesystem, and the paths are absolute): a URI and options, not a
    filesystem object, travel to the workers, and each builds its own client (credentials
    come from the worker's environment).
    `schema` is the schema every read is cast to, so all workers see the same types even
    where files differ (CSV types are inferred per file).
    """

    format: str
    files: tuple[str, ...] = ()
    file_rows: tuple[int, ...] = ()
    synthetic: SyntheticSpec | None = None
    schema: pa.Schema | None = None
    filesystem_uri: str | None = None
    filesystem_options: FilesystemOptions = field(default_factory=FilesystemOptions)
    # the rows held in memory, one Arrow table per entry of `files`, or a Ray object
    # reference to it once it is in Ray's object store: format "table" (`files` name the
    # pieces), or files already read, so that no worker opens them (a sweep's trials)
    pieces: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {FORMATS}")
        if (self.format == "synthetic") != (self.synthetic is not None):
            raise ValueError("a synthetic source needs a spec, and only a synthetic source")
        if len(self.files) != len(self.file_rows):
            raise ValueError(f"{len(self.files)} files but {len(self.file_rows)} row counts")
        if (self.pieces or self.format == "table") and len(self.pieces) != len(self.files):
            raise ValueError(f"{len(self.files)} files but {len(self.pieces)} pieces")
        if self.pieces and self.synthetic is not None:
            raise ValueError("a synthetic source is drawn where it is used: it has no pieces")

    @property
    def total_rows(self) -> int:
        if self.synthetic is not None:
            return self.synthetic.rows
        return sum(self.file_rows)

    def read(self, columns: Sequence[str], start: int, stop: int) -> pa.Table:
        """Global rows [start, stop) of `columns`, in order, cast to the source's schema."""
        columns = list(columns)
        chunks: dict[str, list] = {name: [] for name in columns}
        for _, piece in self.pieces_of(columns, start, stop):
            for name in piece.column_names:
                chunks[name].extend(piece.column(name).chunks)
        # chunks stay as read: combining them would copy the whole range once more
        schema = self.schema_of(columns)
        return pa.table(
            [pa.chunked_array(chunks[name], schema.field(name).type) for name in columns],
            schema=schema,
        )

    def schema_of(self, columns: Sequence[str]) -> pa.Schema:
        """The types `columns` are read as."""
        if self.synthetic is not None:
            every = synthetic_schema(self.synthetic)
            return pa.schema([every.field(name) for name in columns])
        return self._target_schema(list(columns))

    def pieces_of(
        self, columns: Sequence[str], start: int, stop: int
    ) -> Iterator[tuple[int, pa.Table]]:
        """Global rows [start, stop) of `columns`, cast to the source's schema, a piece at a
        time, each with its first row's offset from `start`: some rows of every column (an
        Arrow or CSV batch, a synthetic block), or of one column (a Parquet file's row group,
        whose columns decoded together would cost several times their size). A reader that
        takes each piece as it comes holds one piece, never the whole range."""
        columns = list(columns)
        if not 0 <= start <= stop <= self.total_rows:
            raise ValueError(f"row range [{start}, {stop}) is outside [0, {self.total_rows})")
        if self.synthetic is not None:
            lo = start
            while lo < stop:  # pieces end on a multiple of SYNTHETIC_PIECE_ROWS
                hi = min(stop, (lo // SYNTHETIC_PIECE_ROWS + 1) * SYNTHETIC_PIECE_ROWS)
                yield lo - start, generate(self.synthetic, lo, hi).select(columns)
                lo = hi
            return
        target = self._target_schema(columns)
        filesystem = None if self.pieces else self.filesystem()
        done = 0  # rows of the range in the files before this one
        for file, lo, hi in self.spans(start, stop):
            if self.pieces:
                piece = fetch(self.pieces[self.files.index(file)])
                yield done, piece.slice(lo, hi - lo).select(columns).cast(target)
            else:
                for offset, piece in self._file_pieces(filesystem, file, columns, lo, hi, target):
                    yield done + offset, piece
            done += hi - lo

    def stored(self, put: Callable[[pa.Table], Any]) -> "Source":
        """This source with its in-memory pieces handed to `put` (ray.put: Ray's object
        store), so that each worker fetches only the pieces that hold its rows; pieces
        already there stay as they are."""
        pieces = tuple(put(p) if isinstance(p, pa.Table) else p for p in self.pieces)
        return replace(self, pieces=pieces)

    def loaded(self, columns: Sequence[str], put: Callable[[pa.Table], Any]) -> "Source":
        """This source with `columns` of each file read once and handed to `put` (ray.put):
        its readers fetch those rows from Ray's object store and never open the files. A
        node's readers share one copy, as a sweep's trials do."""
        pieces, start = [], 0
        for rows in self.file_rows:
            pieces.append(put(self.read(columns, start, start + rows)))
            start += rows
        return replace(self, pieces=tuple(pieces))

    def locate(self, row: int) -> str:
        """Global row `row` as a user finds it: its index (from 0, as pandas numbers a table's
        rows), and the file it is in with its index there when the table has several."""
        if len(self.files) == 1:
            return f"row {row} of {self.files[0]}"
        for file, lo, _ in self.spans(row, row + 1):
            return f"row {row}: row {lo} of {file}"
        return f"row {row}"  # synthetic

    def spans(self, start: int, stop: int) -> list[tuple[str, int, int]]:
        """(file, lo, hi) for each file that holds some of global rows [start, stop)."""
        spans = []
        offset = 0  # the global index of the file's first row
        for file, rows in zip(self.files, self.file_rows, strict=True):
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if lo < hi:
                spans.append((file, lo, hi))
            offset += rows
        return spans

    def _file_pieces(
        self,
        filesystem: pafs.FileSystem,
        file: str,
        columns: list[str],
        lo: int,
        hi: int,
        target: pa.Schema,
    ) -> Iterator[tuple[int, pa.Table]]:
        read = 0  # rows of [lo, hi) read, in every column
        pieces = READERS[self.format](filesystem, file, columns, lo, hi, target)
        while True:
            try:
                offset, piece = next(pieces, (0, None))
            except (OSError, pa.ArrowInvalid) as error:
                raise DataError(
                    f"{file}: cannot read rows [{lo}, {hi}): {one_line(error)}"
                ) from None
            if piece is None:
                break
            read = max(read, offset + piece.num_rows)
            names = [name for name in columns if name in piece.schema.names]
            types = pa.schema([target.field(name) for name in names])
            yield offset, pa.table(piece).select(names).cast(types)
        if read != hi - lo:
            raise DataError(
                f"{file}: expected rows [{lo}, {hi}) but read {read}; "
                "did the file change after the run was planned?"
            )

    def filesystem(self) -> pafs.FileSystem:
        """The filesystem the files live in, built where it is used, from the URI and options."""
        if self.filesystem_uri is None:
            return pafs.LocalFileSystem()
        return open_filesystem(self.filesystem_uri, self.filesystem_options)[0]

    def _target_schema(self, columns: list[str]) -> pa.Schema:
        if self.schema is None:
            raise ValueError("a file source needs its schema; build it with open_source()")
        missing = [name for name in columns if name not in self.schema.names]
        if missing:
            raise ValueError(f"no column(s) {missing} in the source; it has {self.schema.names}")
        return pa.schema([self.schema.field(name) for name in columns])


def table_source(table: pa.Table, bounds: Sequence[tuple[int, int]]) -> Source:
    """An in-memory table as a source, cut into one piece per (start, stop) of `bounds` (the
    shards), each piece its own copy: a slice would carry its whole table's buffers along."""
    pieces = tuple(table.slice(lo, hi - lo).combine_chunks() for lo, hi in bounds)
    return Source(
        "table",
        files=tuple(f"rows {lo}..{hi} of the table" for lo, hi in bounds),
        file_rows=tuple(hi - lo for lo, hi in bounds),
        schema=table.schema,
        pieces=pieces,
    )


def fetch(piece: Any) -> pa.Table:
    """A piece of an in-memory table, from Ray's object store where it was put there."""
    if isinstance(piece, pa.Table):
        return piece
    import ray  # only a Ray worker holds references to objects in the store

    return ray.get(piece)


def _read_parquet(
    filesystem: pafs.FileSystem, path: str, columns: list[str], lo: int, hi: int, _: pa.Schema
) -> Iterator[tuple[int, pa.Table]]:
    """Rows [lo, hi) of one file, one column of one row group at a time (with its offset
    from lo), decoding only the row groups that overlap them. Not pre-buffered, which would
    hold a whole row group's compressed bytes beside what is decoded."""
    with pq.ParquetFile(path, filesystem=filesystem, pre_buffer=False) as parquet:
        metadata = parquet.metadata
        offset = 0  # the file's row index of the group's first row
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if offset < hi and offset + rows > lo:
                skip = max(lo - offset, 0)
                take = min(hi - offset, rows) - skip
                for name in columns:
                    piece = parquet.read_row_group(group, columns=[name])
                    yield offset + skip - lo, piece.slice(skip, take)
            offset += rows
            if offset >= hi:
                break


def _read_feather(
    filesystem: pafs.FileSystem, path: str, columns: list[str], lo: int, hi: int, _: pa.Schema
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Rows [lo, hi) of one Arrow IPC file, decoding only `columns` of the batches up to `hi`.

    Read, not memory-mapped: a shard lives for the whole run, and a mapped file rewritten
    under a running worker would crash it with SIGBUS instead of raising an error.
    """
    with filesystem.open_input_file(path) as file:
        full = ipc.open_file(file).schema
        wanted = ipc.IpcReadOptions(included_fields=sorted(full.names.index(c) for c in columns))
        reader = ipc.open_file(file, options=wanted)
        every = (reader.get_batch(b) for b in range(reader.num_record_batches))
        yield from _rows_of(every, lo, hi)


def _read_csv(
    filesystem: pafs.FileSystem, path: str, columns: list[str], lo: int, hi: int, target: pa.Schema
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Rows [lo, hi) of one CSV file: it has no index, so stream it from the top to `hi`."""
    convert = pacsv.ConvertOptions(
        column_types={field.name: field.type for field in target}, include_columns=columns
    )
    with filesystem.open_input_stream(path) as stream:  # .gz/.bz2/.zst: decompressed on the fly
        yield from _rows_of(pacsv.open_csv(stream, convert_options=convert), lo, hi)


def _rows_of(
    batches: Iterable[pa.RecordBatch], lo: int, hi: int
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Rows [lo, hi) of a stream of record batches, as slices with their offset from lo;
    reads no batch past `hi`."""
    offset = 0  # the stream's row index of the batch's first row
    for batch in batches:
        if offset + batch.num_rows > lo:
            skip = max(lo - offset, 0)
            yield offset + skip - lo, batch.slice(skip, min(hi - offset, batch.num_rows) - skip)
        offset += batch.num_rows
        if offset >= hi:
            break


READERS = {"parquet": _read_parquet, "feather": _read_feather, "csv": _read_csv}
