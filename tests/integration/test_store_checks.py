"""The tracking store, checked before any work, and failing at the end of a run in one line.

Real stores: sqlite files on real mounts (a read-only tmpfs, a full one), a port nobody
listens on, a real `mlflow server`.
"""

import errno
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from shardprop.service.errors import ConfigError
from shardprop.service.tracking.store import StoreError, check_store
from shardprop.service.tracking.tracker import Tracker, TrackingError, recall_run
from tests.models import TINY_META, tiny_weights
from tests.processes import MlflowServer, free_port

META = TINY_META


def fill(folder: Path) -> None:
    """Write to `folder` until its disk is full."""
    with open(folder / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * (1 << 16))
                filler.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


@pytest.mark.parametrize("form", ["sqlite", "file", "path"])
def test_a_store_on_a_read_only_mount_is_one_line_before_any_work(mount, form):
    read_only = mount("ro", "ro,size=1m")
    uri = {
        "sqlite": f"sqlite:///{read_only / 'mlflow.db'}",
        "file": (read_only / "mlruns").as_uri(),
        "path": str(read_only / "mlruns"),
    }[form]
    with pytest.raises(ConfigError, match=rf"cannot write to {read_only} .*Read-only file system"):
        check_store(uri)


def test_a_new_store_in_folders_yet_to_exist_passes_and_creates_nothing(tmp_path):
    check_store(f"sqlite:///{tmp_path / 'a' / 'b' / 'mlflow.db'}")
    check_store(str(tmp_path / "c" / "mlruns"))
    assert list(tmp_path.iterdir()) == []


def test_resuming_from_a_sqlite_file_that_is_not_there_creates_no_store(tmp_path):
    db = tmp_path / "typo.db"
    uri = f"sqlite:///{db}"
    with pytest.raises(ConfigError, match=rf"^tracking.uri: no tracking store at {db};"):
        check_store(uri, resuming=True)
    with pytest.raises(ConfigError, match=rf"no tracking store at {db}"):
        recall_run(uri, "0123456789abcdef")
    with pytest.raises(ConfigError, match=rf"no tracking store at {db}"):
        Tracker.reopen(uri, "0123456789abcdef")
    assert list(tmp_path.iterdir()) == []


def test_resuming_from_a_server_that_does_not_answer_says_unreachable_not_no_such_run():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=rf"the MLflow server at {uri} is unreachable") as error:
        recall_run(uri, "0123456789abcdef")
    assert "no run" not in str(error.value)
    assert "--tracking-uri" in str(error.value)


@pytest.mark.slow
def test_a_server_that_answers_passes_and_an_unknown_run_is_named(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        check_store(server.uri)
        check_store(server.uri, resuming=True)
        with pytest.raises(TrackingError, match=rf"no run '0123456789abcdef' in .*{server.uri}"):
            recall_run(server.uri, "0123456789abcdef")
    finally:
        server.stop()


def test_a_full_disk_at_the_end_of_a_run_fails_in_one_line_and_the_weights_stay(
    tmp_path, mount, caplog
):
    store = mount("store", "size=8m")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    weights = tiny_weights(tmp_path / "w.npz")
    example = pa.table({"a": [0.5, -1.0], "b": [2.0, 0.0], "y": [1, 0]})
    tracker = Tracker.start(uri, "full", None, flush_seconds=600)
    tracker.log_metrics(1, {"loss": 1.0})
    fill(store)

    with pytest.raises(StoreError) as failed:
        tracker.log_final(weights, META, example)
    assert "\n" not in str(failed.value)
    assert "No space left on device" in str(failed.value) or "full" in str(failed.value)
    # the run's exit with that failure in flight: told in a line, not a traceback
    with caplog.at_level(logging.WARNING), pytest.raises(StoreError), tracker:
        raise failed.value
    told = [record for record in caplog.records if record.name.startswith("shardprop")]
    assert any("could not mark MLflow run" in record.getMessage() for record in told)
    assert all(record.exc_info is None for record in told)
    assert np.load(weights)["W1"].shape == (3, 2)  # the weights on local disk are whole
