"""MLflow tracking of a run: params, buffered metrics, artifacts, status. Real sqlite stores."""

import os
import sys
import time
from pathlib import Path

import matplotlib.image
import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from shardprop.service.tracking.page import flatten
from shardprop.service.tracking.plots import plot_history
from shardprop.service.tracking.store import resolve_tracking_uri, ui_command
from shardprop.service.tracking.tracker import PARAM_VALUE_LIMIT, Tracker, TrackingError
from tests.models import TINY_META, tiny_weights

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(new_store, tmp_path_factory):
    """One sqlite store for the module: creating its tables takes a second."""
    return new_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def client(store):
    return MlflowClient(store)


def start(store: str, **kwargs) -> Tracker:
    return Tracker.start(store, "tests", "a-run", **kwargs)


def test_flatten_renders_leaves_like_yaml_flow_style():
    config = {
        "data": {"path": None, "synthetic": {"name": "moons", "rows": 200}, "standardize": True},
        "model": {"hidden": [32, 32], "activation": "relu", "names": ["a", "b"]},
        "train": {"learning_rate": 0.5, "l2": 1e-4, "extra": {}},
    }
    assert flatten(config) == {
        "data.path": "null",
        "data.synthetic.name": "moons",
        "data.synthetic.rows": "200",
        "data.standardize": "true",
        "model.hidden": "[32, 32]",
        "model.activation": "relu",
        "model.names": '["a", "b"]',
        "train.learning_rate": "0.5",
        "train.l2": "0.0001",
        "train.extra": "{}",
    }
    assert flatten({"b": 1}, prefix="a.") == {"a.b": "1"}


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri(None) == "http://from-env:5000"


def test_params_are_flattened_and_logged_past_the_batch_limit(store, client):
    many = {f"k{i:03d}": i for i in range(150)}  # more than one log_batch of 100 params
    with start(store, tags={"purpose": "test"}) as tracker:
        tracker.log_params(
            flatten({"model": {"hidden": [8, 4]}, "train": {"learning_rate": 0.5}})
            | {"n_params": 77, "long": "x" * 2000}
            | many
        )
    run = client.get_run(tracker.run_id)
    params = run.data.params
    assert params["model.hidden"] == "[8, 4]"
    assert params["train.learning_rate"] == "0.5"
    assert params["n_params"] == "77"
    assert len(params["long"]) == PARAM_VALUE_LIMIT and params["long"].endswith("...")
    assert all(params[key] == str(value) for key, value in many.items())
    assert run.data.tags["purpose"] == "test"
    assert run.info.run_name == "a-run"
    assert run.info.experiment_id == tracker.experiment_id


def test_metrics_stay_in_memory_until_flushed_then_one_point_per_step(store, client):
    steps, names = 1000, ("loss", "accuracy", "train/grad_norm", "timing/step_seconds", "a", "b")
    tracker = start(store, flush_seconds=3600)  # no timed write during the test
    # this thread's CPU time, not the wall clock: a busy machine descheduling the test
    # must not count as time spent logging
    started = time.thread_time()
    for step in range(1, steps + 1):
        tracker.log_metrics(step, {name: step + i / 10 for i, name in enumerate(names)})
    logging_seconds = time.thread_time() - started

    assert client.get_run(tracker.run_id).data.metrics == {}  # the hot path never wrote
    started = time.thread_time()
    tracker.flush()
    flush_seconds = time.thread_time() - started
    # appending to a queue vs 6000 points through the store: orders of magnitude apart
    assert logging_seconds < 0.1 * flush_seconds

    tracker.log_metrics(steps + 1, {"loss": 0.0})  # queued after the flush, written by end()
    tracker.end()
    for i, name in enumerate(names):
        history = client.get_metric_history(tracker.run_id, name)
        last = steps + 1 if name == "loss" else steps
        assert sorted(m.step for m in history) == list(range(1, last + 1))
        assert all(m.value == m.step + i / 10 for m in history if m.step <= steps)


def test_writer_thread_sends_metrics_without_a_flush(store, client):
    tracker = start(store, flush_seconds=0.05)
    for step in range(1, 4):
        tracker.log_metrics(step, {"loss": 1.0 / step})
    deadline = time.monotonic() + 10
    while len(client.get_metric_history(tracker.run_id, "loss")) < 3:
        assert time.monotonic() < deadline, "the writer thread never wrote the metrics"
        time.sleep(0.05)
    tracker.end()


def test_clean_exit_finishes_the_run(store, client):
    with start(store) as tracker:
        tracker.log_metrics(1, {"loss": 0.5})
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.end_time is not None
    assert run.data.metrics == {"loss": 0.5}  # flushed before the status changed


def test_exception_fails_the_run_and_propagates(store, client):
    with pytest.raises(ZeroDivisionError), start(store) as tracker:
        tracker.log_metrics(1, {"loss": 0.5})
        raise ZeroDivisionError("boom")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ZeroDivisionError: boom"
    assert run.data.metrics == {"loss": 0.5}


def test_ctrl_c_kills_the_run(store, client):
    with pytest.raises(KeyboardInterrupt), start(store) as tracker:
        raise KeyboardInterrupt
    assert client.get_run(tracker.run_id).info.status == "KILLED"


def test_an_ended_run_refuses_metrics_and_ends_once(store, client):
    tracker = start(store)
    tracker.end("FAILED")
    tracker.end("FINISHED")  # a second end changes nothing
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(RuntimeError, match="has ended"):
        tracker.log_metrics(2, {"loss": 0.1})
    with pytest.raises(ValueError, match="unknown run status 'DONE'"):
        tracker.end("DONE")


def test_artifacts_are_stored_with_the_run(store, client, tmp_path):
    config = {"model": {"hidden": [32, 32], "activation": "relu"}, "train": {"steps": 5}}
    weights = tmp_path / "weights.npz"
    weights.write_bytes(b"not really weights")
    plot = plot_history({"loss": [1.0, 0.5, 0.25]}, tmp_path / "loss.png")
    with start(store) as tracker:
        tracker.log_dict(config, "config.yaml")
        tracker.log_dict({"loss": 0.25}, "metrics.json")
        tracker.log_text("hello", "notes/readme.txt")
        tracker.log_artifact(weights, "weights")
        tracker.log_artifact(plot, "plots")
        tracker.set_tags({"stage": "done", "workers": 2})

    listed = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "metrics.json", "notes", "weights", "plots"} <= listed
    local = Path(client.download_artifacts(tracker.run_id, "", tmp_path / "down"))
    text = (local / "config.yaml").read_text()
    assert yaml.safe_load(text) == config
    assert text.index("model") < text.index("train")  # the config's order, not sorted
    assert "hidden: [32, 32]" in text
    assert (local / "notes" / "readme.txt").read_text() == "hello"
    assert (local / "weights" / "weights.npz").read_bytes() == b"not really weights"
    assert (local / "plots" / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
    assert client.get_run(tracker.run_id).data.tags["workers"] == "2"


def test_sqlite_artifacts_go_beside_the_database_not_the_working_dir(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    with Tracker.start(uri, "beside", None) as tracker:
        tracker.log_text("x", "x.txt")
    artifact_uri = MlflowClient(uri).get_run(tracker.run_id).info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "db" / "mlruns").as_uri())
    assert list(elsewhere.iterdir()) == []


def test_a_deleted_experiment_is_named(store, client):
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(TrackingError, match=r"experiment 'gone' is deleted.*restore"):
        Tracker.start(store, "gone", None)


def test_ui_command_opens_this_store():
    assert ui_command("sqlite:////data/my runs/mlflow.db") == (
        "mlflow ui --backend-store-uri 'sqlite:////data/my runs/mlflow.db'"
    )
    assert ui_command("http://mlflow:5000") == "python -m webbrowser http://mlflow:5000"


def test_tracker_does_not_touch_the_global_mlflow_state(store, tmp_path, monkeypatch):
    """A caller with its own MLflow session (store, active run) keeps it through a whole run,
    model included, and nothing of the run lands in the caller's store."""
    theirs = f"sqlite:///{tmp_path / 'theirs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", theirs)
    weights = tiny_weights(tmp_path / "w.npz")
    meta = dict(TINY_META)
    example = pd.DataFrame({"a": [0.5, -1.0], "b": [2.0, 0.0], "y": [1, 0]})
    with mlflow.start_run() as their_run:
        before = (mlflow.get_tracking_uri(), os.environ["MLFLOW_TRACKING_URI"], list(sys.path))
        with start(store) as tracker:
            tracker.log_metrics(1, {"loss": 1.0})
            info = tracker.log_model(weights, meta, example)
            assert mlflow.active_run().info.run_id == their_run.info.run_id
        after = (mlflow.get_tracking_uri(), os.environ["MLFLOW_TRACKING_URI"], list(sys.path))
        assert after == before
        assert mlflow.active_run().info.run_id == their_run.info.run_id
    assert MlflowClient(theirs).get_run(their_run.info.run_id).outputs.model_outputs == []
    ours = MlflowClient(store)
    assert [o.model_id for o in ours.get_run(tracker.run_id).outputs.model_outputs] == [
        info.model_id
    ]
    model = ours.get_logged_model(info.model_id)
    assert (model.experiment_id, model.source_run_id) == (tracker.experiment_id, tracker.run_id)
    assert model.status == "READY"
    assert [(m.key, m.step) for m in model.metrics] == [("loss", 1)]  # the run's last step


def test_plot_is_a_png_with_a_panel_per_curve_family(tmp_path):
    history = {
        "loss": [1.0, 0.5, 0.2],
        "val_loss": [1.1, 0.6, 0.3],
        "accuracy": [0.5, 0.7, 0.9],
        "val_accuracy": [0.4, 0.6, 0.8],
        "train/grad_norm": [3.0, 2.0, 1.0],
    }
    path = plot_history(history, tmp_path / "plots" / "loss.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    wide = matplotlib.image.imread(path)
    only_loss = matplotlib.image.imread(plot_history({"loss": [2.0, 1.0]}, tmp_path / "l.png"))
    assert wide.shape[1] == 2 * only_loss.shape[1]  # loss and accuracy side by side
    with pytest.raises(ValueError, match="no loss or accuracy"):
        plot_history({"train/grad_norm": [1.0]}, tmp_path / "none.png")
    # a loss near the float range (a run about to diverge) still plots, on a linear scale
    huge = plot_history({"loss": [2.4e93, 1.2e280]}, tmp_path / "huge.png")
    assert huge.read_bytes().startswith(PNG_SIGNATURE)
