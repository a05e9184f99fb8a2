"""The data plan: which rows exist, which columns to use, and which rows go to which worker.

Planned from metadata only (Parquet and Feather footers; CSV has none, so its rows are
counted by streaming each file once, without keeping it). No row is ever held on the
coordinator: the workers read their own ranges through workers/data/source.py's Source.

Remote paths (s3://, gs://, hdfs://, ...) take data.filesystem options; the coordinator
resolves them once (environment, URI query, bucket region) and the Source carries the result,
so every worker builds the same client the plan was made with.
"""

import difflib
import fnmatch
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.feather as feather
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shardprop.workers.data.columns import CATEGORICAL, NUMERIC, Column, is_categorical_type
from shardprop.workers.data.source import (
    FilesystemOptions,
    Source,
    one_line,
    open_filesystem,
    table_source,
)
from shardprop.workers.data.split import contiguous_ranges
from shardprop.workers.data.synthetic import SyntheticSpec
from shardprop.workers.data.synthetic import schema as synthetic_schema
from shardprop.workers.errors import DataError
from shardprop.workers.reduction.blocktree import BlockGrid

EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",  # pyarrow decompresses streams by extension
    ".csv.bz2": "csv",
    ".csv.zst": "csv",
    ".feather": "feather",
    ".arrow": "feather",
    ".ipc": "feather",
}
KNOWN = ".parquet/.pq, .csv, .feather/.arrow/.ipc"
IGNORED_PREFIXES = (".", "_")  # hidden files, _SUCCESS, _metadata: as Spark and pyarrow do
PANDAS_INDEX = "__index_level_"  # a DataFrame's index saved by to_parquet: not a feature
METADATA_THREADS = 16  # footers on object stores are latency-bound: fetch them in parallel
S3_URI_OPTIONS = ("endpoint_override", "scheme", "region")  # pyarrow's s3:// query keys we map
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # boto3's; pyarrow ignores them


def open_source(
    path: str | None,
    synthetic: SyntheticSpec | None,
    filesystem: Mapping[str, Any] | None = None,
) -> Source:
    """A Source for a file, a folder, a glob or a URI of them, or for a synthetic spec.

    `filesystem` is data.filesystem ({endpoint, region, anonymous}; None values: not set); it
    applies to s3:// and gs:// paths and is ignored for local ones.
    """
    options = filesystem_options(filesystem)
    if synthetic is not None and path is None:
        return Source("synthetic", synthetic=synthetic, schema=synthetic_schema(synthetic))
    if path is None or synthetic is not None:
        raise DataError("data: set exactly one of data.path and data.synthetic")
    fs, filesystem_uri, options, found = _find_files(path, options)
    files = sorted(file for file in found if _format_of(file) is not None)
    if not files:
        raise DataError(f"data.path: {path}: unknown file type; expected {KNOWN}")
    fmt = _format_of(files[0])
    other = next((file for file in files if _format_of(file) != fmt), None)
    if fmt is None or other is not None:
        raise DataError(
            f"data.path: {path} mixes formats: {files[0]} and {other}; use one format per folder"
        )
    with ThreadPoolExecutor(min(METADATA_THREADS, len(files))) as pool:
        metadata = list(pool.map(lambda file: _metadata(fs, fmt, file), files))
    return Source(
        format=fmt,
        files=tuple(files),
        file_rows=tuple(rows for rows, _ in metadata),
        schema=_unify(files, [schema for _, schema in metadata]),
        filesystem_uri=filesystem_uri,
        filesystem_options=options,
    )


def filesystem_options(filesystem: Mapping[str, Any] | None) -> FilesystemOptions:
    """data.filesystem as a Source carries it; a key it does not know is a config mistake."""
    if filesystem is None:
        return FilesystemOptions()
    known = [f.name for f in fields(FilesystemOptions)]
    unknown = sorted(set(filesystem) - set(known))
    if unknown:
        raise DataError(f"data.filesystem: unknown key {unknown[0]!r}; expected {', '.join(known)}")
    return FilesystemOptions(**filesystem)


def schema_of(source: Source) -> pa.Schema:
    """The one schema of all the source's files (open_source checked that they agree)."""
    if source.schema is None:
        raise ValueError("the source has no schema; build it with open_source()")
    return source.schema


def resolve_columns(
    schema: pa.Schema,
    label: str,
    features: Sequence[str] | None,
    where: str = "the data",
    categorical: Sequence[str] = (),
) -> tuple[list[Column], list[tuple[str, str]]]:
    """The feature columns, checked, each numeric or categorical, and the columns left out
    with why. features None: every numeric and categorical column but the label.
    `categorical`: integer columns to one-hot (text, dictionaries and booleans always are)."""
    names = schema.names
    if label not in names:
        raise DataError(f"data.label: no column {label!r} in {where}{_hint(label, names)}")
    for name in categorical:
        if name not in names:
            raise DataError(f"data.categorical: no column {name!r} in {where}{_hint(name, names)}")
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or is_categorical_type(kind)):
            raise DataError(
                f"data.categorical: column {name!r} in {where} has type {kind}; only integer, "
                "text and boolean columns can be categorical"
            )
        if name == label:
            raise DataError(f"data.categorical: {name!r} is the label column (data.label)")
        if features is not None and name not in features:
            raise DataError(f"data.categorical: {name!r} is not in data.features")
    if features is not None:
        if not features:
            raise DataError("data.features: empty list; list feature columns or use null for all")
        repeated = sorted({name for name in features if list(features).count(name) > 1})
        if repeated:
            raise DataError(
                f"data.features: column(s) {', '.join(map(repr, repeated))} listed twice"
            )
        for name in features:
            if name not in names:
                raise DataError(f"data.features: no column {name!r} in {where}{_hint(name, names)}")
            if name == label:
                raise DataError(f"data.features: {name!r} is the label column (data.label)")
            if _column_kind(schema.field(name).type, name in categorical) is None:
                raise DataError(
                    f"data.features: column {name!r} in {where} has type "
                    f"{schema.field(name).type}; features must be numbers, text or booleans"
                )
    chosen, left_out = [], []
    for field in schema:
        kind = _column_kind(field.type, field.name in categorical)
        if field.name == label:
            continue
        if features is not None:
            if field.name in features:
                continue  # added below, in the order listed
            left_out.append((field.name, "not in data.features"))
        elif field.name.startswith(PANDAS_INDEX):
            left_out.append((field.name, "a saved pandas index"))
        elif kind is None:
            left_out.append((field.name, f"type {field.type} is neither a number nor a category"))
        else:
            chosen.append(Column(field.name, kind))
    if features is not None:
        chosen = [
            Column(name, _column_kind(schema.field(name).type, name in categorical))
            for name in features
        ]
    if not chosen:
        raise DataError(
            f"data.features: {where} has no numeric or categorical column besides the label "
            f"{label!r}; columns: {_listing(names)}"
        )
    return chosen, left_out


def _column_kind(kind: pa.DataType, listed_categorical: bool) -> str | None:
    if is_categorical_type(kind) or (listed_categorical and pa.types.is_integer(kind)):
        return CATEGORICAL
    if _is_number(kind):
        return NUMERIC
    return None


def split_rows(total_rows: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) per rank; the first total % workers ranks get one row more."""
    if total_rows < 1:
        raise DataError("data: the data has no rows to train on")
    if workers < 1:
        raise DataError(f"cluster.workers: need at least 1 worker to split rows, got {workers}")
    if workers > total_rows:
        raise DataError(
            f"cluster.workers: {workers} workers but only {total_rows} rows; "
            f"use at most {total_rows} workers"
        )
    return contiguous_ranges(total_rows, workers)


@dataclass(frozen=True)
class DataPlan:
    """What the coordinator hands the workers: the source, the columns and each rank's rows."""

    source: Source
    columns: tuple[Column, ...]  # the features, each numeric or categorical (levels unset)
    label: str
    shards: tuple[tuple[int, int], ...]  # (start, stop) of global rows, one per rank
    grid: BlockGrid | None = None  # the row blocks of the exact reduction; None: rank order
    left_out: tuple[tuple[str, str], ...] = ()  # (column, why) of the columns not used

    @property
    def total_rows(self) -> int:
        return self.source.total_rows

    @property
    def features(self) -> tuple[str, ...]:
        """The feature columns' names, as the table has them."""
        return tuple(column.name for column in self.columns)

    def resharded(self, workers: int) -> "DataPlan":
        """The same rows cut into `workers` shards, as plan_data cuts them: whole blocks of
        the same grid under the exact reduction, whose sums are then the same bits."""
        rows = self.total_rows
        shards = self.grid.split(workers) if self.grid else split_rows(rows, workers)
        return replace(self, shards=tuple(shards))


def plan_data(
    path: str | None,
    synthetic: SyntheticSpec | None,
    label: str,
    features: Sequence[str] | None,
    workers: int,
    filesystem: Mapping[str, Any] | None = None,
    exact: bool = False,
    block_rows: int | None = None,
    categorical: Sequence[str] = (),
    table: pa.Table | None = None,
    chunk: int = 1,
    source: Source | None = None,
) -> DataPlan:
    """Open the source, check the columns and split the rows; workers=0: one in-process shard.
    `exact`: the rows are cut into blocks (of `block_rows`, None: by the row count) and each
    rank gets whole blocks, for the exact reduction; automatic blocks are whole `chunk`s
    (the network's chunk width) where they can be. `table`: rows in memory instead of a
    path, cut into one piece per shard. `source`: data.path already opened, and its rows
    perhaps already read (Source.loaded: a sweep's)."""
    if workers < 0:
        raise DataError(f"cluster.workers: must be >= 0 (0 runs in-process), got {workers}")
    if table is not None:
        if path is not None or synthetic is not None:
            raise DataError("data: give a table or data.path / data.synthetic, not both")
        rows, where = table.num_rows, "the table"
    else:
        source = source or open_source(path, synthetic, filesystem)
        rows, where = source.total_rows, path if path is not None else "the synthetic dataset"
    if rows == 0:
        raise DataError(f"data.path: {path or where} has no rows")
    grid = BlockGrid.for_rows(rows, block_rows, chunk) if exact else None
    shards = grid.split(max(workers, 1)) if grid else split_rows(rows, max(workers, 1))
    if table is not None:  # in memory: one piece per shard, for Ray's object store
        source = table_source(table, shards)
    columns, left_out = resolve_columns(
        schema_of(source), label, features, where=where, categorical=categorical
    )
    return DataPlan(source, tuple(columns), label, tuple(shards), grid, tuple(left_out))


def write_table(table: pa.Table, path: str | os.PathLike, row_group_rows: int = 65536) -> Path:
    """Write a table as Parquet, CSV or Feather (by extension): for tests and examples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = _format_of(path.name)
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=row_group_rows)
    elif fmt == "feather":
        feather.write_feather(table, path, chunksize=row_group_rows)
    elif fmt == "csv" and path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        raise ValueError(f"{path}: write_table writes .parquet, .pq, .csv, .feather, .arrow, .ipc")
    return path


def _find_files(
    path: str, options: FilesystemOptions
) -> tuple[pafs.FileSystem, str | None, FilesystemOptions, list[str]]:
    """The filesystem, the URI and options that rebuild it (None: local) and the files named."""
    is_uri = "://" in path
    # a URI's query holds filesystem options (?region=, ?endpoint_override=): not the glob's
    location, _, query = path.partition("?") if is_uri else (path, "", "")
    glob_at = min((i for i, c in enumerate(location) if c in "*?["), default=-1)
    base = location if glob_at < 0 else location[: location.rfind("/", 0, glob_at) + 1]
    pattern = location[len(base) :]
    if is_uri:
        uri = base
        if location.partition("://")[0].lower() == "s3":
            options = _s3_options(path, base, query, options)
        elif query:
            uri = f"{base}?{query}"
        filesystem, base_path = open_filesystem(uri, options)
        local = isinstance(filesystem, pafs.LocalFileSystem)
        filesystem_uri = None if local else uri
    else:
        filesystem, filesystem_uri = pafs.LocalFileSystem(), None
        base_path = os.path.abspath(os.path.expanduser(base or "."))
    if filesystem_uri is None:
        options = FilesystemOptions()  # a local path has nothing to configure
    base_path = base_path.rstrip("/") or "/"
    if glob_at >= 0:
        return filesystem, filesystem_uri, options, _glob(filesystem, base_path, pattern, path)
    info = _info(filesystem, base_path, path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.path: no such file or folder: {path}")
    if info.type == pafs.FileType.File:
        return filesystem, filesystem_uri, options, [base_path]
    files = [
        f.path
        for f in _listing_of(filesystem, base_path, path)
        if not _ignored(f.path[len(base_path) :]) and _format_of(f.path) is not None
    ]
    if not files:
        raise DataError(f"data.path: folder {path} holds no {KNOWN} files")
    return filesystem, filesystem_uri, options, files


def _s3_options(path: str, uri: str, query: str, options: FilesystemOptions) -> FilesystemOptions:
    """The options every worker will use for an s3:// path, resolved once, on the coordinator.

    pyarrow's URI options (?endpoint_override=&scheme=&region=) fold into data.filesystem; an
    unset endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (pyarrow ignores those);
    an unset region on AWS itself is looked up from the bucket, as FileSystem.from_uri does.
    Resolved here, so that the workers read from the very server the plan was made from.
    """
    if query:
        if options.is_set:
            raise DataError(
                f"data.path: {path}: filesystem options in the URI and in data.filesystem; "
                "use one place"
            )
        given = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(given) - set(S3_URI_OPTIONS))
        if unknown:
            raise DataError(
                f"data.path: {path}: unknown URI option {unknown[0]!r}; "
                "set data.filesystem.endpoint / region / anonymous instead"
            )
        endpoint = given.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{given.get('scheme', 'https')}://{endpoint}"
        options = FilesystemOptions(endpoint=endpoint or None, region=given.get("region"))
    endpoint = options.endpoint or next(
        (os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name)), None
    )
    region = options.region
    if region is None and endpoint is None:
        bucket = urlsplit(uri).netloc.rpartition("@")[2]
        try:
            region = pafs.resolve_s3_region(bucket)
        except (OSError, ValueError) as error:
            raise DataError(
                f"data.path: {path}: cannot find the region of bucket {bucket!r} "
                f"({one_line(error)}); set data.filesystem.region"
            ) from None
    return replace(options, endpoint=endpoint, region=region)


def _glob(filesystem: pafs.FileSystem, base_path: str, pattern: str, path: str) -> list[str]:
    """Files under base_path whose relative path matches pattern, component by component."""
    parts = pattern.split("/")
    if _info(filesystem, base_path, path).type != pafs.FileType.Directory:
        raise DataError(f"data.path: no such folder {base_path} for the pattern {path}")
    files = []
    for info in _listing_of(filesystem, base_path, path, recursive=len(parts) > 1):
        names = info.path[len(base_path) :].strip("/").split("/")
        if len(names) == len(parts) and all(
            fnmatch.fnmatchcase(name, part)
            and (part.startswith(IGNORED_PREFIXES) or not name.startswith(IGNORED_PREFIXES))
            for name, part in zip(names, parts, strict=True)
        ):
            files.append(info.path)
    if not files:
        raise DataError(f"data.path: no files match {path}")
    return files


def _info(filesystem: pafs.FileSystem, fs_path: str, path: str) -> pafs.FileInfo:
    try:
        return filesystem.get_file_info(fs_path)
    except OSError as error:
        raise DataError(f"data.path: cannot open {path}: {one_line(error)}") from None


def _listing_of(
    filesystem: pafs.FileSystem, folder: str, path: str, recursive: bool = True
) -> list[pafs.FileInfo]:
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(folder, recursive=recursive))
    except OSError as error:
        raise DataError(f"data.path: cannot list {path}: {one_line(error)}") from None
    return [info for info in infos if info.type == pafs.FileType.File]


def _ignored(relative: str) -> bool:
    return any(part.startswith(IGNORED_PREFIXES) for part in relative.split("/") if part)


def _format_of(name: str) -> str | None:
    lower = name.lower()
    return next((fmt for ext, fmt in EXTENSIONS.items() if lower.endswith(ext)), None)


def _metadata(filesystem: pafs.FileSystem, fmt: str, file: str) -> tuple[int, pa.Schema]:
    """(rows, schema) of one file, from its footer; CSV: streamed once, nothing kept."""
    try:
        if fmt == "parquet":
            with pq.ParquetFile(file, filesystem=filesystem) as parquet:
                return parquet.metadata.num_rows, parquet.schema_arrow
        if fmt == "feather":
            # the dataset API counts from batch headers, without decompressing the bodies
            dataset = ds.dataset(file, format="ipc", filesystem=filesystem)
            return dataset.count_rows(), dataset.schema
        return _csv_metadata(filesystem, file)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(
            f"data.path: {file}: not a readable {fmt} file ({one_line(error)})"
        ) from None


def _csv_metadata(filesystem: pafs.FileSystem, file: str) -> tuple[int, pa.Schema]:
    """Rows and column types of a CSV file, streamed batch by batch.

    The streaming reader infers types from the first block only; when a later block does not
    fit (an integer column with a 1.5 further down), read the file whole once, whose
    inference sees every row, and let the workers read with those types.
    """
    with filesystem.open_input_stream(file) as stream:
        reader = pacsv.open_csv(stream)
        rows = 0
        try:
            for batch in reader:
                rows += batch.num_rows
            return rows, reader.schema
        except pa.ArrowInvalid:
            pass
    with filesystem.open_input_stream(file) as stream:
        table = pacsv.read_csv(stream)
    return table.num_rows, table.schema


def _unify(files: list[str], schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for all files, in the first file's column order; DataError where they clash."""
    for file, schema in zip(files, schemas, strict=True):
        repeated = sorted({name for name in schema.names if schema.names.count(name) > 1})
        if repeated:
            raise DataError(f"data.path: {file}: column {repeated[0]!r} appears more than once")
    first = files[0]
    types = {field.name: field.type for field in schemas[0]}
    for file, schema in zip(files[1:], schemas[1:], strict=True):
        for name in types:
            if name not in schema.names:
                raise DataError(f"data.path: {file} has no column {name!r} (but {first} has)")
        for field in schema:
            if field.name not in types:
                raise DataError(f"data.path: {file} has a column {field.name!r} {first} lacks")
            merged = _merge(types[field.name], field.type)
            if merged is None:
                raise DataError(
                    f"data.path: {file}: column {field.name!r} is {field.type}, "
                    f"but earlier files have {types[field.name]}"
                )
            types[field.name] = merged
    return pa.schema([pa.field(name, kind) for name, kind in types.items()])


def _merge(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type both fit in: the same, the other one if one is all-null, or a wider number."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if _is_number(a) and _is_number(b):
        pair = [pa.schema([("c", a)]), pa.schema([("c", b)])]
        try:
            return pa.unify_schemas(pair, promote_options="permissive").field("c").type
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.float64()
    return None


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def _hint(name: str, names: list[str]) -> str:
    """'; did you mean ...? columns: ...': the closest name, then what there is."""
    close = [n for n in names if n.lower() == name.lower()]
    close = close or difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    return f"{suggestion} columns: {_listing(names)}"


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
