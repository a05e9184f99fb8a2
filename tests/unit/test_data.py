"""The data plan and the row-range reads, on real Parquet, CSV and Feather files."""

import gzip
import itertools
import pickle
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from shardprop.service.data.plan import (
    DataPlan,
    open_source,
    plan_data,
    resolve_columns,
    schema_of,
    split_rows,
    write_table,
)
from shardprop.workers.data import source
from shardprop.workers.data.source import FilesystemOptions, Source
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from shardprop.workers.errors import DataError

EXTENSION = {"parquet": "parquet", "csv": "csv", "feather": "feather"}
SIZES = (1000, 1500, 700, 1300)  # uneven files: 4500 rows
COLUMNS = ["x0", "x1", "flag", "name", "y"]


def make_table(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "x0": rng.standard_normal(rows),
            "x1": rng.integers(-5, 5, rows),
            "flag": rng.random(rows) < 0.5,
            "name": pc.binary_join_element_wise("r", pa.array(np.arange(rows).astype(str)), ""),
            "y": rng.integers(0, 2, rows),
        }
    )


def write_folder(folder, fmt: str, sizes=SIZES, row_group_rows: int = 300) -> pa.Table:
    """Files part-0.., each with several row groups (record batches); returns the whole table."""
    whole = make_table(sum(sizes))
    offsets = [0, *itertools.accumulate(sizes)]
    for i, (start, stop) in enumerate(itertools.pairwise(offsets)):
        write_table(whole.slice(start, stop - start), folder / f"part-{i}.{fmt}", row_group_rows)
    return whole


RANGES = [
    (0, 0),
    (0, 1),
    (0, 4500),
    (299, 301),  # a row-group boundary
    (999, 1001),  # a file boundary
    (1000, 2500),  # exactly one file
    (950, 3300),  # three files
    (2499, 2500),
    (4499, 4500),
    (4500, 4500),
    (123, 4321),
]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
def test_folder_read_equals_the_same_slice_of_the_whole_table(tmp_path, fmt):
    whole = write_folder(tmp_path, fmt)
    source = open_source(str(tmp_path), None)
    assert source.format == fmt
    assert source.file_rows == SIZES and source.total_rows == 4500
    for start, stop in RANGES:
        expected = whole.select(["y", "x0", "name"]).slice(start, stop - start)
        assert source.read(["y", "x0", "name"], start, stop).equals(expected), (start, stop)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
def test_single_file_read_equals_the_slice(tmp_path, fmt):
    whole = make_table(2000)
    path = write_table(whole, tmp_path / f"data.{fmt}", row_group_rows=256)
    source = open_source(str(path), None)
    assert source.files == (str(path),) and source.total_rows == 2000
    assert schema_of(source).names == COLUMNS
    for start, stop in [(0, 2000), (255, 257), (700, 1900), (1999, 2000)]:
        assert source.read(COLUMNS, start, stop).equals(whole.slice(start, stop - start))


def test_parquet_read_decodes_only_the_overlapping_row_groups(tmp_path, monkeypatch):
    whole = make_table(3000)
    path = write_table(whole, tmp_path / "data.parquet", row_group_rows=500)
    source = open_source(str(path), None)
    asked = []
    original = pq.ParquetFile.read_row_group

    def spy(self, group, *args, **kwargs):
        asked.append(group)
        return original(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    got = source.read(["x0", "y"], 1200, 2100)
    assert asked == [2, 2, 3, 3, 4, 4]  # one column at a time
    assert got.equals(whole.select(["x0", "y"]).slice(1200, 900))


def test_synthetic_pieces_make_up_a_range_that_starts_inside_one():
    spec = SyntheticSpec("blobs", 200_000, features=2)
    source = Source("synthetic", synthetic=spec)
    pieces = list(source.pieces_of(["x0", "y"], 100_000, 200_000))
    assert [offset for offset, _ in pieces] == [0, 31_072, 96_608]
    whole = pa.concat_tables([piece for _, piece in pieces])
    assert whole.equals(generate(spec, 100_000, 200_000).select(["x0", "y"]))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
def test_a_read_comes_in_pieces_that_make_up_the_rows(tmp_path, fmt):
    """A worker takes one piece at a time: each piece is some rows of some columns, at its
    offset, and together they are every column's rows, once."""
    whole = make_table(2000)
    path = write_table(whole, tmp_path / f"data.{fmt}", row_group_rows=256)
    source = open_source(str(path), None)
    columns = ["x0", "y"]
    parts: dict[str, list] = {name: [] for name in columns}
    for offset, piece in source.pieces_of(columns, 300, 1700):
        assert piece.num_rows > 0
        for name in piece.column_names:
            parts[name].append((offset, piece.column(name)))
    for name in columns:
        offsets = [offset for offset, _ in parts[name]]
        assert offsets == sorted(offsets) and offsets[0] == 0
        got = pa.chunked_array([c for _, values in parts[name] for c in values.chunks])
        assert got.equals(whole.column(name).slice(300, 1400))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
def test_read_opens_only_the_files_that_hold_the_rows(tmp_path, fmt):
    whole = write_folder(tmp_path, fmt)
    source = open_source(str(tmp_path), None)
    for i in (0, 3):  # rows [1000, 3200) live in files 1 and 2 only
        (tmp_path / f"part-{i}.{fmt}").write_bytes(b"not a data file")
    assert source.read(["x1"], 1000, 3200).equals(whole.select(["x1"]).slice(1000, 2200))
    with pytest.raises(DataError, match=r"part-0\.\w+: cannot read rows \[0, 10\)"):
        source.read(["x1"], 0, 10)


def test_planning_reads_footers_not_rows(tmp_path, monkeypatch):
    rows = 200_000
    for i in range(8):
        write_table(make_table(rows, seed=i), tmp_path / f"part-{i}.parquet", 50_000)

    def forbidden(*args, **kwargs):
        raise AssertionError("planning must not read rows")

    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    began = time.perf_counter()
    plan = plan_data(str(tmp_path), None, "y", None, workers=3)
    assert time.perf_counter() - began < 5.0
    assert plan.total_rows == 8 * rows
    assert plan.features == ("x0", "x1", "flag", "name")
    assert plan.shards == ((0, 533_334), (533_334, 1_066_667), (1_066_667, 1_600_000))


def test_uris_and_globs_name_the_same_files_as_paths(tmp_path):
    whole = write_folder(tmp_path, "parquet")
    write_table(make_table(5), tmp_path / "other.parquet")  # in the folder, not the glob
    by_path = open_source(str(tmp_path / "part-*.parquet"), None)
    by_uri = open_source(tmp_path.as_uri(), None)
    by_glob_uri = open_source(tmp_path.as_uri() + "/part-*.parquet", None)
    assert by_path.files == tuple(str(tmp_path / f"part-{i}.parquet") for i in range(4))
    assert by_uri.files == (str(tmp_path / "other.parquet"), *by_path.files)
    assert by_uri.filesystem_uri is None  # file:// is the local filesystem
    assert by_glob_uri.files == by_path.files
    assert by_glob_uri.read(["x0"], 900, 1100).equals(whole.select(["x0"]).slice(900, 200))


def test_folder_skips_hidden_and_underscore_files_and_sorts_by_name(tmp_path):
    whole = write_folder(tmp_path, "parquet")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / "_metadata.parquet").write_bytes(b"junk")
    (tmp_path / ".part-9.parquet.crc").write_bytes(b"junk")
    (tmp_path / "README.txt").write_text("notes")
    source = open_source(str(tmp_path), None)
    assert [f.rsplit("/", 1)[-1] for f in source.files] == [f"part-{i}.parquet" for i in range(4)]
    assert source.read(["y"], 0, 4500).equals(whole.select(["y"]))


def test_compressed_csv_is_read_as_csv(tmp_path):
    whole = make_table(3000)
    write_table(whole, tmp_path / "plain.csv")
    (tmp_path / "data.csv.gz").write_bytes(gzip.compress((tmp_path / "plain.csv").read_bytes()))
    source = open_source(str(tmp_path / "data.csv.gz"), None)
    assert source.format == "csv" and source.total_rows == 3000
    assert source.read(COLUMNS, 1500, 2600).equals(whole.slice(1500, 1100))


def test_source_pickles_and_reads_the_same_rows_after(tmp_path):
    whole = write_folder(tmp_path, "feather")
    source = pickle.loads(pickle.dumps(open_source(str(tmp_path), None)))
    assert source == open_source(str(tmp_path), None)
    assert source.read(["x0"], 10, 3000).equals(whole.select(["x0"]).slice(10, 2990))


def test_numeric_types_that_differ_between_files_widen(tmp_path):
    write_table(pa.table({"a": pa.array([1, 2], pa.int32()), "y": [0, 1]}), tmp_path / "0.parquet")
    write_table(pa.table({"a": [0.5, 1.5], "y": [1, 0]}), tmp_path / "1.parquet")
    source = open_source(str(tmp_path), None)
    assert schema_of(source).field("a").type == pa.float64()
    assert source.read(["a"], 1, 3).column("a").to_pylist() == [2.0, 0.5]


def test_csv_whose_later_rows_break_the_first_block_types(tmp_path):
    rows = 300_000  # well past the streaming reader's first 1 MB block
    lines = ["a,y", *(f"{i % 97},{i % 2}" for i in range(rows)), "1.5,1"]
    path = tmp_path / "late.csv"
    path.write_text("\n".join(lines) + "\n")
    source = open_source(str(path), None)
    assert source.total_rows == rows + 1
    assert schema_of(source).field("a").type == pa.float64()
    assert source.read(["a", "y"], rows - 1, rows + 1).to_pydict() == {
        "a": [float((rows - 1) % 97), 1.5],
        "y": [(rows - 1) % 2, 1],
    }


def test_synthetic_source_reads_generated_rows():
    spec = SyntheticSpec("blobs", rows=10_000, seed=3)
    plan = plan_data(None, spec, "y", None, workers=4)
    assert plan.features == ("x0", "x1") and plan.total_rows == 10_000
    assert plan.source.read(["x1", "y"], 4000, 9000).equals(
        generate(spec, 4000, 9000).select(["x1", "y"])
    )


def test_zero_workers_plans_one_in_process_shard(tmp_path):
    write_folder(tmp_path, "parquet")
    plan = plan_data(str(tmp_path), None, "y", ["x1", "x0"], workers=0)
    assert isinstance(plan, DataPlan)
    assert plan.shards == ((0, 4500),)
    assert plan.features == ("x1", "x0") and plan.label == "y"


# ---- user mistakes: one DataError naming the key, file or column ----


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data\.path: no such file or folder: .*nope\.parquet"):
        open_source(str(tmp_path / "nope.parquet"), None)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data\.path: folder .*empty holds no"):
        open_source(str(tmp_path / "empty"), None)


def test_unknown_extension(tmp_path):
    (tmp_path / "data.txt").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"data\.path: .*data\.txt: unknown file type"):
        open_source(str(tmp_path / "data.txt"), None)


def test_glob_that_matches_nothing(tmp_path):
    with pytest.raises(DataError, match=r"data\.path: no files match .*\*\.parquet"):
        open_source(str(tmp_path / "*.parquet"), None)


def test_folder_mixing_formats(tmp_path):
    write_table(make_table(10), tmp_path / "a.parquet")
    write_table(make_table(10), tmp_path / "b.csv")
    mixed = r"data\.path: .* mixes formats: .*a\.parquet and .*b\.csv; use one format"
    with pytest.raises(DataError, match=mixed):
        open_source(str(tmp_path), None)


def test_corrupt_file_is_named(tmp_path):
    write_table(make_table(10), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match=r"data\.path: .*b\.parquet: not a readable parquet file"):
        open_source(str(tmp_path), None)


def test_files_that_disagree_on_a_column_type_name_the_file_and_column(tmp_path):
    write_table(pa.table({"a": [1.0, 2.0], "y": [0, 1]}), tmp_path / "0.parquet")
    write_table(pa.table({"a": ["x", "z"], "y": [0, 1]}), tmp_path / "1.parquet")
    with pytest.raises(DataError, match=r"data\.path: .*1\.parquet: column 'a' is string"):
        open_source(str(tmp_path), None)


def test_files_with_different_columns_name_the_file_and_column(tmp_path):
    write_table(pa.table({"a": [1.0], "y": [0]}), tmp_path / "0.parquet")
    write_table(pa.table({"b": [1.0], "y": [0]}), tmp_path / "1.parquet")
    with pytest.raises(DataError, match=r"data\.path: .*1\.parquet has no column 'a'"):
        open_source(str(tmp_path), None)


def test_path_and_synthetic_are_exclusive(tmp_path):
    with pytest.raises(DataError, match=r"data: set exactly one of data\.path and data\.synthetic"):
        open_source(str(tmp_path), SyntheticSpec("moons", 10))
    with pytest.raises(DataError, match="exactly one"):
        plan_data(None, None, "y", None, workers=1)


SCHEMA = make_table(1).schema


def names_and_kinds(columns_and_left_out: tuple) -> list[tuple[str, str]]:
    return [(column.name, column.kind) for column in columns_and_left_out[0]]


def test_features_default_to_every_numeric_and_categorical_column_but_the_label():
    assert names_and_kinds(resolve_columns(SCHEMA, "y", None)) == [
        ("x0", "numeric"),
        ("x1", "numeric"),
        ("flag", "categorical"),
        ("name", "categorical"),
    ]
    assert [name for name, _ in names_and_kinds(resolve_columns(SCHEMA, "x0", None))] == [
        "x1",
        "flag",
        "name",
        "y",
    ]


def test_integer_columns_are_categorical_when_listed():
    columns = names_and_kinds(resolve_columns(SCHEMA, "x0", None, categorical=["y"]))
    assert ("y", "categorical") in columns


@pytest.mark.parametrize(
    ("categorical", "message"),
    [
        (["x0"], r"column 'x0' .*has type double; only integer, text and boolean"),
        (["nope"], r"no column 'nope'"),
        (["y"], r"'y' is the label column"),
    ],
)
def test_bad_categorical_lists(categorical, message):
    with pytest.raises(DataError, match=r"data\.categorical: .*" + message):
        resolve_columns(SCHEMA, "y", None, categorical=categorical)


def test_columns_left_out_say_why():
    schema = SCHEMA.append(pa.field("when", pa.timestamp("s")))
    schema = schema.append(pa.field("__index_level_0__", pa.int64()))
    columns, left_out = resolve_columns(schema, "y", None)
    assert [column.name for column in columns] == ["x0", "x1", "flag", "name"]
    assert left_out == [
        ("when", "type timestamp[s] is neither a number nor a category"),
        ("__index_level_0__", "a saved pandas index"),
    ]
    _, left_out = resolve_columns(schema, "y", ["x1"])
    assert ("x0", "not in data.features") in left_out


def test_missing_label_suggests_the_closest_column():
    with pytest.raises(DataError, match=r"data\.label: no column 'Y' .*did you mean 'y'\?") as e:
        resolve_columns(SCHEMA, "Y", None, where="train.parquet")
    assert "train.parquet" in str(e.value) and "x0, x1, flag, name, y" in str(e.value)


def test_missing_feature_suggests_the_closest_column():
    with pytest.raises(DataError, match=r"data\.features: no column 'x_1'.*did you mean 'x1'"):
        resolve_columns(SCHEMA, "y", ["x0", "x_1"])


def test_a_feature_of_another_type_names_the_column_and_its_type():
    schema = SCHEMA.append(pa.field("when", pa.timestamp("s")))
    with pytest.raises(DataError, match=r"data\.features: column 'when' .*has type timestamp"):
        resolve_columns(schema, "y", ["x0", "when"])


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (["x0", "y"], r"'y' is the label column"),
        (["x0", "x0"], r"'x0' listed twice"),
        ([], r"empty list"),
    ],
)
def test_bad_feature_lists(features, message):
    with pytest.raises(DataError, match=r"data\.features: .*" + message):
        resolve_columns(SCHEMA, "y", features)


def test_no_numeric_feature_left():
    schema = pa.schema([("when", pa.timestamp("s")), ("y", pa.int64())])
    with pytest.raises(DataError, match=r"data\.features: .*no numeric or categorical column"):
        resolve_columns(schema, "y", None)


# ---- split_rows ----


TOTALS = (1, 2, 3, 7, 10, 64, 100, 1001, 4099)
WORKERS = (1, 2, 3, 4, 7, 8, 64)


@pytest.mark.parametrize(("total", "workers"), [(t, k) for t in TOTALS for k in WORKERS if k <= t])
def test_split_rows_is_contiguous_and_balanced(total, workers):
    shards = split_rows(total, workers)
    assert len(shards) == workers
    assert shards[0][0] == 0 and shards[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shards))
    sizes = [stop - start for start, stop in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the first total % k ranks get the extra row
    assert sum(size > total // workers for size in sizes) == total % workers


def test_more_workers_than_rows():
    with pytest.raises(DataError, match=r"cluster\.workers: 5 workers but only 3 rows"):
        split_rows(3, 5)


def test_no_rows_or_no_workers():
    with pytest.raises(DataError, match="no rows"):
        split_rows(0, 1)
    with pytest.raises(DataError, match=r"cluster\.workers"):
        split_rows(10, 0)


def test_empty_csv_plans_to_a_clear_error(tmp_path):
    (tmp_path / "empty.csv").write_text("a,y\n")
    with pytest.raises(DataError, match=r"data\.path: .*empty\.csv has no rows"):
        plan_data(str(tmp_path / "empty.csv"), None, "y", ["a"], workers=1)


def test_read_outside_the_rows_is_a_programming_error(tmp_path):
    path = write_table(make_table(10), tmp_path / "a.parquet")
    source = open_source(str(path), None)
    with pytest.raises(ValueError, match="outside"):
        source.read(["x0"], 5, 11)
    with pytest.raises(ValueError, match="synthetic"):
        Source("parquet", synthetic=SyntheticSpec("moons", 10))


# ---- filesystem options (data.filesystem); a real S3 server: integration/test_data_s3.py ----


def closed_port() -> int:
    """A loopback port nothing listens on: an unreachable store that fails fast."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_cloud_environment(monkeypatch, tmp_path):
    """No credential lookup or endpoint may reach past loopback."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def test_filesystem_options_do_not_touch_local_paths(tmp_path):
    whole = write_folder(tmp_path, "parquet")
    settings = {"endpoint": "http://127.0.0.1:1", "region": "eu-west-3", "anonymous": True}
    plan = plan_data(str(tmp_path), None, "y", None, 2, filesystem=settings)
    assert plan.source.filesystem_uri is None
    assert plan.source.filesystem_options == FilesystemOptions()
    assert plan.source.read(["x0"], 0, 4500).equals(whole.select(["x0"]))


def test_source_with_filesystem_options_pickles_equal():
    options = FilesystemOptions(endpoint="http://127.0.0.1:9000", region="r", anonymous=False)
    source = Source("parquet", ("b/a.parquet",), (3,), None, SCHEMA, "s3://b/", options)
    assert pickle.loads(pickle.dumps(source)) == source


def test_unknown_filesystem_key_is_named():
    with pytest.raises(DataError, match=r"data\.filesystem: unknown key 'profile'; expected endp"):
        open_source("s3://bucket/data/", None, {"endpoint": None, "profile": "x"})


@pytest.mark.parametrize("endpoint", ["ftp://host:21", "http://", "http://host:9000/bucket"])
def test_malformed_endpoint_is_named(no_cloud_environment, endpoint):
    with pytest.raises(DataError, match=r"data\.filesystem\.endpoint: expected http://host:port"):
        open_source("s3://bucket/data/", None, {"endpoint": endpoint})


def test_unknown_s3_uri_option_is_named(no_cloud_environment):
    with pytest.raises(DataError, match=r"data\.path: s3://b/x\?foo=1: unknown URI option 'foo'"):
        open_source("s3://b/x?foo=1", None)


@pytest.mark.parametrize(
    ("path", "settings", "message"),
    [
        ("s3://bucket/data/", {"anonymous": True}, r"cannot open s3://bucket/data/: .*NETWORK"),
        ("gs://bucket/data/", {"anonymous": True}, r"cannot open gs://bucket/data/: .*UNAVAIL"),
        ("hdfs://127.0.0.1:{port}/data/", None, r"cannot open hdfs://127\.0\.0\.1:\d+/data/: "),
    ],
)
def test_unreachable_store_is_one_data_error_line(
    no_cloud_environment, monkeypatch, path, settings, message
):
    port = closed_port()
    monkeypatch.setattr(source, "GCS_RETRY_SECONDS", 0.2)  # GCS retries, by default
    if settings is not None:
        settings = {**settings, "endpoint": f"http://127.0.0.1:{port}"}
    with pytest.raises(DataError, match=r"data\.path: " + message) as error:
        open_source(path.format(port=port), None, settings)
    assert "\n" not in str(error.value) and len(str(error.value)) < 500


def test_options_a_filesystem_does_not_take_are_refused(no_cloud_environment):
    with pytest.raises(DataError, match=r"data\.filesystem: hdfs:// takes no endpoint/region"):
        open_source("hdfs://127.0.0.1:1/data/", None, {"region": "eu-west-3"})
    with pytest.raises(DataError, match=r"data\.filesystem\.region: gs:// buckets have no region"):
        open_source("gs://bucket/data/", None, {"region": "eu-west-3"})


@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
def test_a_loaded_source_reads_its_rows_without_its_files(tmp_path, fmt):
    """Source.loaded reads each file once (a sweep's rows, for Ray's object store); its
    readers then never open the files, and see the same rows, types and row names."""
    whole = write_folder(tmp_path, fmt)
    source = open_source(str(tmp_path), None)
    stored = []
    loaded = source.loaded(["y", "x0", "name"], lambda piece: stored.append(piece) or piece)
    assert [piece.num_rows for piece in stored] == list(SIZES)
    for file in tmp_path.iterdir():
        file.unlink()
    for start, stop in RANGES:
        expected = source.schema_of(["y", "x0", "name"])
        got = pickle.loads(pickle.dumps(loaded)).read(["name", "x0"], start, stop)
        assert got.equals(whole.select(["name", "x0"]).slice(start, stop - start)), (start, stop)
        assert got.schema == pa.schema([expected.field("name"), expected.field("x0")])
    assert loaded.locate(1200) == source.locate(1200)  # errors still name the file's row
