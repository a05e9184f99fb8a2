"""Sources on a real S3-compatible server (moto's standalone server, on 127.0.0.1 only).

The coordinator plans from the footers on the server; every worker rebuilds its own client
from the pickled Source and reads its rows over HTTP. The rows must be the very rows of the
local copy, for any worker count.
"""

import itertools
import logging
import pickle

import pyarrow as pa
import pytest

from shardprop.service.data.plan import open_source, plan_data, write_table
from shardprop.workers.errors import DataError
from tests.unit.test_data import make_table

BUCKET = "shardprop-data"
SIZES = (1200, 700, 1500, 900)  # uneven files, 4300 rows
ROW_GROUP_ROWS = 256  # several row groups per file
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def dataset(s3_server, tmp_path_factory):
    """The same Parquet files in a local folder and under s3://BUCKET/data/; the whole table."""
    import boto3

    folder = tmp_path_factory.mktemp("local")
    whole = make_table(sum(SIZES))
    offsets = [0, *itertools.accumulate(SIZES)]
    for i, (start, stop) in enumerate(itertools.pairwise(offsets)):
        piece = whole.slice(start, stop - start)
        write_table(piece, folder / f"part-{i}.parquet", ROW_GROUP_ROWS)
    write_table(make_table(10, seed=9), folder / "extra.parquet")  # in the prefix, not the glob
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    for file in folder.iterdir():
        client.upload_file(str(file), BUCKET, f"data/{file.name}")
    return folder, whole, client


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch, tmp_path):
    """Fake credentials from the environment, and nothing that could reach past loopback."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def options(endpoint: str) -> dict:
    return {"endpoint": endpoint, "region": None, "anonymous": False}


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_every_worker_reads_the_same_rows_from_s3_as_from_the_local_copy(
    s3_server, dataset, workers
):
    folder, whole, _ = dataset
    remote = plan_data(f"s3://{BUCKET}/data/", None, "y", None, workers, options(s3_server))
    local = plan_data(str(folder), None, "y", None, workers)
    assert remote.source.files == tuple(
        f"{BUCKET}/data/{file.rsplit('/', 1)[-1]}" for file in local.source.files
    )
    assert remote.source.file_rows == local.source.file_rows
    assert remote.features == local.features and remote.shards == local.shards
    columns = [*remote.features, remote.label]
    pieces = []
    for start, stop in remote.shards:
        worker_source = pickle.loads(pickle.dumps(remote.source))  # as Ray ships it
        pieces.append(worker_source.read(columns, start, stop))
        assert pieces[-1].equals(local.source.read(columns, start, stop)), (start, stop)
    union = pa.concat_tables(pieces)
    assert union.slice(10).equals(whole.select(columns))  # extra.parquet's 10 rows sort first


def test_workers_reach_the_server_the_plan_was_made_from(s3_server, dataset, monkeypatch):
    """An endpoint from AWS_ENDPOINT_URL is settled on the coordinator and travels along."""
    _, whole, _ = dataset
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    source = open_source(f"s3://{BUCKET}/data/part-1.parquet", None)
    assert source.filesystem_options.endpoint == s3_server
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # a worker whose environment lacks it
    shipped = pickle.loads(pickle.dumps(source))
    assert shipped.read(["x0", "y"], 100, 650).equals(whole.select(["x0", "y"]).slice(1300, 550))


def test_a_glob_over_s3_names_only_the_matching_objects(s3_server, dataset):
    _, whole, _ = dataset
    source = open_source(f"s3://{BUCKET}/data/part-*.parquet", None, options(s3_server))
    assert source.files == tuple(f"{BUCKET}/data/part-{i}.parquet" for i in range(4))
    assert source.read(["x1", "name"], 1100, 2000).equals(
        whole.select(["x1", "name"]).slice(1100, 900)
    )
    every = open_source(f"s3://{BUCKET}/data/", None, options(s3_server))
    assert every.files[0] == f"{BUCKET}/data/extra.parquet" and len(every.files) == 5


def test_uri_query_options_work_like_data_filesystem(s3_server, dataset):
    _, whole, _ = dataset
    address = s3_server.removeprefix("http://")
    path = f"s3://{BUCKET}/data/part-3.parquet?endpoint_override={address}&scheme=http"
    source = pickle.loads(pickle.dumps(open_source(path, None)))
    assert source.filesystem_uri == f"s3://{BUCKET}/data/part-3.parquet"
    assert source.read(["y"], 0, 900).equals(whole.select(["y"]).slice(3400, 900))
    with pytest.raises(DataError, match=r"in the URI and in data\.filesystem; use one place"):
        open_source(path, None, options(s3_server))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("s3://no-such-bucket/data/", r"data\.path: no such file or folder: s3://no-such-bucket"),
        (f"s3://{BUCKET}/nope.parquet", r"data\.path: no such file or folder: s3://.*nope"),
        (f"s3://{BUCKET}/nope/*.parquet", r"data\.path: no such folder .*nope for the pattern"),
        (f"s3://{BUCKET}/data/*.csv", r"data\.path: no files match s3://.*\*\.csv"),
    ],
)
def test_missing_bucket_or_key_is_one_data_error_line(s3_server, dataset, path, message):
    with pytest.raises(DataError, match=message) as error:
        open_source(path, None, options(s3_server))
    assert "\n" not in str(error.value)


def test_an_object_removed_after_planning_names_the_file(s3_server, dataset):
    folder, _, client = dataset
    client.upload_file(str(folder / "part-0.parquet"), BUCKET, "gone/part-0.parquet")
    source = open_source(f"s3://{BUCKET}/gone/", None, options(s3_server))
    client.delete_object(Bucket=BUCKET, Key="gone/part-0.parquet")
    with pytest.raises(DataError, match=r"gone/part-0\.parquet: cannot read rows \[0, 10\)") as e:
        source.read(["x0"], 0, 10)
    assert "\n" not in str(e.value)


def test_wrong_credentials_are_one_data_error_line(s3_server, dataset):
    """moto refuses unsigned requests: anonymous access fails as a denied one would."""
    settings = {**options(s3_server), "anonymous": True}
    with pytest.raises(DataError, match=r"data\.path: cannot open s3://.*ACCESS_DENIED") as e:
        open_source(f"s3://{BUCKET}/data/part-0.parquet", None, settings)
    assert "\n" not in str(e.value)
