"""A run's MLflow page as people read it, and the model registry: real runs in process,
real sqlite stores, read back through MLflow's client."""

import json
import subprocess
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.config import config_from, load_config
from shardprop.service.data.lineage import input_record
from shardprop.service.data.plan import write_table
from shardprop.service.errors import ConfigError
from shardprop.service.tracking.page import flatten, git_commit, in_force
from shardprop.service.tracking.plots import history_curves
from shardprop.service.tracking.tracker import Tracker
from shardprop.service.training.run import make_plan, train
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from tests.models import TINY_META, tiny_weights

ROOT = Path(__file__).resolve().parents[2]
MOONS = "{name: moons, rows: 600, noise: 0.2, seed: 1}"
SETTINGS = [
    "data.validation_fraction=0.25",
    "model.hidden=[8]",
    "train.steps=30",
    "train.eval_every=10",
    "train.checkpoint_every=10",
]


def settings(uri: str, *sets: str):
    return load_config(
        None,
        [f"data.synthetic={MOONS}", *SETTINGS, *sets],
        {"cluster.workers": 0, "tracking.uri": uri},
    )


def features() -> pd.DataFrame:
    return generate(SyntheticSpec("moons", rows=50, seed=9), 0, 50).select(["x0", "x1"]).to_pandas()


def load(uri: str, model_uri: str):
    """A model from the store at `uri`; the process's tracking URI and import path left as
    they were (load_model reads the first and prepends the model's code to the second)."""
    saved_sys_path = list(sys.path)
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
        sys.path[:] = saved_sys_path


@pytest.fixture(scope="module")
def page(new_store, tmp_path_factory):
    """One binary run with a validation split, in process: its store, run and result."""
    folder = tmp_path_factory.mktemp("page")
    uri = new_store(folder)
    result = train(settings(uri), output=folder / "out")
    return uri, MlflowClient(uri).get_run(result.run_id), result


def test_headline_metrics_are_top_level_and_timing_and_workers_in_sections(page):
    _, run, _ = page
    headline = {"loss", "accuracy", "precision", "recall", "f1"}
    headline |= {f"val_{name}" for name in headline} | {"val_roc_auc"}
    sections = {
        "train/grad_norm",
        "train/learning_rate",
        "timing/step_seconds",
        "timing/elapsed_seconds",
        "timing/allreduce_seconds",
        "timing/samples_per_second",
        "timing/straggler_ratio",
        "worker_0/forward_seconds",
        "worker_0/backward_seconds",
        "worker_0/wait_seconds",
        "worker_0/read_seconds",
    }
    assert set(run.data.metrics) == headline | sections


def test_params_are_the_settings_in_force_and_nothing_unset(page):
    _, run, result = page
    params = run.data.params
    assert params["train.optimizer"] == "gd"
    assert not [key for key in params if key.split(".")[-1] in ("momentum", "beta1", "epsilon")]
    assert [key for key in params if key.startswith("cluster.")] == ["cluster.workers"]
    assert not [key for key in params if key.startswith(("worker_", "tracking.enabled"))]
    assert "data.standardize_target" not in params  # a classifier's target is not scaled
    assert not [key for key, value in params.items() if value in ("null", "[]", "{}")]
    assert params["train.eval_every"] == "10"
    assert params["n_val_rows"] == str(result.setup.val_rows)
    assert params["data.synthetic.name"] == "moons"


@pytest.mark.parametrize(
    "optimizer, kept, dropped",
    [
        ("gd", ("learning_rate", "schedule"), ("momentum", "beta1", "history_size")),
        ("momentum", ("momentum",), ("beta1", "beta2", "epsilon", "history_size")),
        ("adam", ("beta1", "beta2", "epsilon"), ("momentum", "history_size")),
        ("lbfgs", ("history_size",), ("learning_rate", "schedule", "momentum", "beta1")),
    ],
)
def test_only_the_chosen_optimizers_settings_are_params(optimizer, kept, dropped):
    resolved = config_from({"train": {"optimizer": optimizer}}).resolved()
    params = flatten(in_force(resolved, "regression"))
    assert all(f"train.{key}" in params for key in kept)
    assert not any(f"train.{key}" in params for key in dropped)
    assert "data.standardize_target" in params  # a regression's target is
    assert "cluster.transport" in params  # two Ray workers by default: the cluster acts
    assert "train.eval_every" not in params  # no validation split
    assert config_from({}).resolved()["train"]["beta1"] == 0.9  # config.yaml keeps them all


def test_tags_name_the_code_and_one_json_holds_the_checkpoint_fingerprints(page, tmp_path):
    uri, run, result = page
    tags = run.data.tags
    assert tags["shardprop.version"] == version("shardprop")
    assert tags.get("shardprop.git_commit") == git_commit(ROOT)
    assert "thread(s)" in tags["shardprop.blas"]
    assert not [name for name in tags if name.startswith("weights_sha256.")]
    path = MlflowClient(uri).download_artifacts(
        run.info.run_id, "checkpoints/fingerprints.json", tmp_path
    )
    fingerprints = json.loads(Path(path).read_text())
    local = {
        folder.name: json.loads((folder / "manifest.json").read_text())["weights_sha256"]
        for folder in sorted((result.output / "checkpoints").glob("step-*"))
    }
    assert list(fingerprints) == ["step-000010", "step-000020", "step-000030"]
    assert fingerprints == local
    assert fingerprints["step-000030"] == tags["weights_sha256"]


def test_the_git_commit_is_that_of_a_shardprop_checkout_only(tmp_path):
    assert git_commit(tmp_path) is None  # no repository
    assert git_commit(ROOT / "service") is None  # inside one, but not its top folder
    if (ROOT / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert git_commit(ROOT) == head


def test_the_description_says_data_network_workers_and_result(page):
    _, run, result = page
    note = run.data.tags["mlflow.note.content"]
    setup, final = result.setup, result.final
    assert note.startswith("**Binary classification** of `y` (2 classes) from 2 input(s).")
    assert f"synthetic moons, {setup.rows:,} rows to train, {setup.val_rows:,} to validate" in note
    assert "2 → 8 → 1, relu" in note and "gd, learning rate 0.5, up to 30 full-batch steps" in note
    assert "workers: in-process (0 workers)" in note
    outcome = note.split("**Result**")[1]
    assert f"train: loss {final['loss']:.4g}, accuracy {final['accuracy']:.4g}" in outcome
    assert f"validation: loss {final['val_loss']:.4g}" in outcome


def test_validation_curves_are_drawn_at_their_steps(page):
    uri, run, result = page
    loss, accuracy = history_curves(result.history, result.steps)
    assert loss["loss"] == (list(range(1, 31)), result.history["loss"])
    assert loss["val_loss"] == ([10, 20, 30], result.history["val_loss"])
    assert accuracy["val_accuracy"] == ([10, 20, 30], result.history["val_accuracy"])
    stored = MlflowClient(uri).get_metric_history(run.info.run_id, "val_loss")
    assert sorted(point.step for point in stored) == [10, 20, 30]
    plots = {item.path for item in MlflowClient(uri).list_artifacts(run.info.run_id, "plots")}
    assert "plots/loss.png" in plots


def test_the_logged_model_has_a_name_and_still_loads_as_runs_model(page):
    uri, run, _ = page
    client = MlflowClient(uri)
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "moons-y-binary"
    assert "loss" in {metric.key for metric in model.metrics}
    assert not [metric.key for metric in model.metrics if "/" in metric.key]  # headline only
    frame = features()
    by_run = load(uri, f"runs:/{run.info.run_id}/model").predict(frame)
    by_id = load(uri, f"models:/{output.model_id}").predict(frame)
    np.testing.assert_array_equal(by_run, by_id)


def test_two_runs_register_versions_1_and_2_with_their_metrics(new_store, tmp_path):
    uri = new_store(tmp_path)
    name = "moons-classifier"
    first = train(settings(uri, f"tracking.register_model={name}"), output=tmp_path / "one")
    assert first.registered == f"models:/{name}/1"
    config = tmp_path / "second.yaml"  # the second through the command's flag
    config.write_text(
        f"data: {{synthetic: {MOONS.replace('seed: 1', 'seed: 2')}, validation_fraction: 0.25}}\n"
        "model: {hidden: [8]}\ntrain: {steps: 30, eval_every: 10, checkpoint_every: 0}\n"
    )
    invoked = CliRunner().invoke(
        app,
        [
            "train",
            str(config),
            "--workers",
            "0",
            "--tracking-uri",
            uri,
            "--output",
            str(tmp_path / "two"),
            "--register-model",
            name,
            "--quiet",
        ],
    )
    assert invoked.exit_code == 0, invoked.output
    second = json.loads((tmp_path / "two" / "metrics.json").read_text())

    client = MlflowClient(uri)
    versions = sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)
    )
    assert [(int(v.version), v.run_id) for v in versions] == [
        (1, first.run_id),
        (2, second["run_id"]),
    ]
    for registered, final in zip(versions, (first.final, second), strict=True):
        for metric in ("loss", "accuracy", "f1", "val_loss", "val_accuracy", "val_roc_auc"):
            assert float(registered.tags[metric]) == pytest.approx(final[metric], rel=1e-5)
        assert "synthetic moons" in registered.description
        assert "**Result**" in registered.description
        assert "2 → 8 → 1" in registered.description
        (output,) = client.get_run(registered.run_id).outputs.model_outputs
        assert registered.source == client.get_logged_model(output.model_id).artifact_location

    frame = features()
    second_run = load(uri, f"runs:/{second['run_id']}/model").predict(frame)
    np.testing.assert_array_equal(load(uri, f"models:/{name}/2").predict(frame), second_run)
    client.set_registered_model_alias(name, "champion", "2")
    np.testing.assert_array_equal(load(uri, f"models:/{name}@champion").predict(frame), second_run)
    first_run = load(uri, f"models:/{name}/1").predict(frame)
    np.testing.assert_array_equal(
        first_run, load(uri, f"runs:/{first.run_id}/model").predict(frame)
    )
    assert not np.array_equal(first_run, second_run)


def test_register_model_needs_tracking_and_a_name_the_registry_takes():
    with pytest.raises(ConfigError, match=r"tracking\.register_model: the registry is MLflow's"):
        config_from({"tracking": {"enabled": False, "register_model": "m"}})
    with pytest.raises(ConfigError, match=r"tracking\.register_model: 'a/b' is empty or holds"):
        config_from({"tracking": {"register_model": "a/b"}})


def test_mlflow_has_nothing_to_warn_about_our_dataset_and_model(new_store, tmp_path):
    """The dataset's source type is named, not resolved (a local path matches two of
    MLflow's source types), and the model's input schema is built from the example's types
    (MLflow's inference adds a hint about integer columns)."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"a": rng.standard_normal(40), "b": rng.integers(0, 5, 40), "y": rng.integers(0, 2, 40)}
    )
    data = write_table(
        pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "counts.parquet"
    )
    plan = make_plan(config_from({"data": {"path": str(data)}, "cluster": {"workers": 0}}))
    weights = tiny_weights(tmp_path / "w.npz")
    meta = dict(TINY_META)
    uri = new_store(tmp_path)
    with (
        Tracker.start(uri, "quiet", None) as tracker,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        tracker.log_lineage(input_record(plan, str(data)), [])
        info = tracker.log_model(weights, meta, frame)
    # what a user sees: Python hides deprecation warnings raised inside a library (MLflow's
    # own use of pandas raises one)
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in shown] == []
    (dataset,) = MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert dataset.dataset.source_type == "local"
    assert json.loads(dataset.dataset.source) == {"uri": str(data)}
    assert [(c["name"], c["type"]) for c in info.signature.inputs.to_dict()] == [
        ("a", "double"),
        ("b", "long"),
    ]


@pytest.mark.parametrize(
    "schedule, kept",
    [
        ("constant", ()),
        ("cosine", ("min_learning_rate",)),
        ("step", ("decay_every", "decay_factor")),
    ],
)
def test_a_schedules_own_settings_are_params_with_that_schedule_only(schedule, kept):
    train = {"schedule": schedule, "decay_every": 10}
    params = flatten(in_force(config_from({"train": train}).resolved(), "binary"))
    own = ("min_learning_rate", "decay_every", "decay_factor")
    assert [key for key in own if f"train.{key}" in params] == list(kept)
    assert params["train.schedule"] == schedule
