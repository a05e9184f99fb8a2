"""`shardprop train` as a user runs it: a subprocess, real Ray, a real MLflow store, read back."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from shardprop.service.data.plan import write_table
from shardprop.service.tracking.serving import load_bundle, predict_frame
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from tests.processes import MlflowServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def shardprop(*args, cwd):
    # the console script pip installed beside this interpreter: what a user runs
    command = [str(Path(sys.executable).parent / "shardprop"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def artifacts(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def check_run(uri, run_id, steps, workers, rows, ran=None):
    """The run's page; `ran`: the steps taken, when the run stopped by itself before `steps`."""
    ran = ran or steps
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["workers"] == str(workers)
    assert params["n_rows"] == str(rows)
    assert int(params["n_params"]) > 0
    assert params["model.hidden"] == "[32, 32]"
    assert params["train.steps"] == str(steps)
    names = {
        "loss",
        "accuracy",
        "train/grad_norm",
        "timing/step_seconds",
        "timing/allreduce_seconds",
        "timing/samples_per_second",
        "timing/straggler_ratio",
    }
    names |= {
        f"worker_{rank}/{phase}_seconds"
        for rank in range(max(workers, 1))
        for phase in ("forward", "backward", "wait")
    }
    assert names <= set(run.data.metrics)
    assert run.data.metrics["timing/straggler_ratio"] >= 1.0
    for rank in range(max(workers, 1)):
        (read,) = client.get_metric_history(run_id, f"worker_{rank}/read_seconds")
        assert read.step == 0 and read.value > 0
    assert not any("read_seconds" in name for name in params)
    for name in names:
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == list(range(1, ran + 1)), name
    files = artifacts(client, run_id)
    assert {
        "config.yaml",
        "weights/final.npz",
        "plots/loss.png",
        "plots/timing.png",
        "checkpoints/fingerprints.json",
        "model/MLmodel",
    } <= set(files)
    return files


def test_default_config_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    result = shardprop(
        "train", ROOT / "configs/default.yaml", "--tracking-uri", uri, "--output", out, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    final = json.loads((out / "metrics.json").read_text())
    assert final["accuracy"] >= 0.97
    # the slowest worker's share of the loop (figures: docs/performance.md); the steps of
    # this small job take milliseconds, so what Ray and the coordinator add weighs on it
    assert 0.5 <= final["compute_fraction"] < 1, final["compute_fraction"]
    # lbfgs stops by itself once the loss stops going down, long before its 500 steps
    ran = len(MlflowClient(uri).get_metric_history(final["run_id"], "loss"))
    assert 10 <= ran < 100
    files = check_run(uri, final["run_id"], 500, 2, 20_000, ran)
    assert f"checkpoints/step-{ran // 10 * 10:06d}/weights.npz" in files
    assert final["run_id"] in result.stdout and "mlflow ui" in result.stdout


def test_parquet_file_end_to_end_and_the_logged_model_predicts_like_the_network(tmp_path):
    table = generate(SyntheticSpec("circles", rows=3001, noise=0.1, seed=4), 0, 3001)
    data = write_table(table, tmp_path / "circles.parquet", row_group_rows=500)
    config = tmp_path / "circles.yaml"
    config.write_text(f"data: {{path: {data}}}\ntrain: {{steps: 40, checkpoint_every: 20}}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    result = shardprop(
        "train",
        config,
        "--workers",
        3,
        "--tracking-uri",
        uri,
        "--experiment",
        "circles",
        "--run-name",
        "e2e",
        "--output",
        out,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    run_id = json.loads((out / "metrics.json").read_text())["run_id"]
    files = check_run(uri, run_id, 40, 3, 3001)
    assert {
        "checkpoints/step-000020/weights.npz",
        "checkpoints/step-000040/state.npz",
        "checkpoints/step-000040/manifest.json",
    } <= set(files)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "e2e"

    with np.load(out / "weights.npz", allow_pickle=False) as weights:
        assert sorted(weights.files) == ["W1", "W2", "W3", "b1", "b2", "b3"]
    frame = table.select(["x0", "x1"]).to_pandas()
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(frame)
    expected = predict_frame(load_bundle(out / "weights.npz", out / "model.json"), frame)
    np.testing.assert_allclose(np.asarray(served), expected, rtol=1e-12)
    # and the bundle is the network itself: standardise by hand, run the forward pass
    meta = json.loads((out / "model.json").read_text())
    X = (frame.to_numpy() - meta["mean"]) / meta["std"]
    bundle = load_bundle(out / "weights.npz", out / "model.json")
    np.testing.assert_allclose(expected, bundle.network.predict(bundle.theta, X.T)[0], rtol=1e-12)


def test_regression_through_the_cli_explains_98_percent_of_the_variance(tmp_path):
    table = generate(SyntheticSpec("regression", rows=5000, noise=0.1, features=4), 0, 5000)
    data = write_table(table, tmp_path / "reg.parquet")
    out = tmp_path / "out"
    result = shardprop(
        "train",
        "/dev/null",
        "--set",
        f"data.path={data}",
        "--set",
        "train.optimizer=adam",
        "--set",
        "train.learning_rate=0.01",
        "--set",
        "train.steps=300",
        "--workers",
        2,
        "--output",
        out,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    final = json.loads((out / "metrics.json").read_text())
    mse = 2 * final["loss"]  # the loss is half the squared error
    assert 1 - mse / table["y"].to_numpy().var() >= 0.97
    meta = json.loads((out / "model.json").read_text())
    assert (meta["task"], meta["classes"]) == ("regression", None)


def test_multiclass_string_labels_through_the_cli(tmp_path):
    import pyarrow as pa

    spec = SyntheticSpec("blobs", rows=3000, noise=0.15, seed=3, classes=4, features=4)
    table = generate(spec, 0, 3000)
    names = np.array(["alpha", "beta", "delta", "gamma"])[table["y"].to_numpy()]
    data = write_table(table.set_column(4, "y", pa.array(names)), tmp_path / "blobs.parquet")
    out = tmp_path / "out"
    result = shardprop(
        "train",
        ROOT / "configs/blobs-multiclass.yaml",
        "--set",
        "data.synthetic=null",
        "--set",
        f"data.path={data}",
        "--set",
        "train.steps=150",
        "--workers",
        3,
        "--output",
        out,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    final = json.loads((out / "metrics.json").read_text())
    assert final["accuracy"] >= 0.95
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["alpha", "beta", "delta", "gamma"]


def test_quiet_prints_nothing_at_all_on_a_run_with_ray_workers(tmp_path):
    """Nothing of ours, of MLflow's or of Ray's own start: not its notice that a local
    runtime uses a token, nor any of its start-up warnings."""
    result = shardprop(
        "train",
        "--quiet",
        "--workers",
        2,
        "--set",
        "data.synthetic.rows=2000",
        "--set",
        "train.steps=20",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--output",
        tmp_path / "out",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert (tmp_path / "out" / "weights.npz").is_file()


def test_a_run_says_nothing_of_ray_token_authentication(tmp_path):
    """Ray's notice that it turned token authentication on is about our own start of Ray."""
    result = shardprop(
        "train",
        "--workers",
        2,
        "--set",
        "data.synthetic.rows=2000",
        "--set",
        "train.steps=5",
        "--no-tracking",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "token" not in (result.stdout + result.stderr).lower()
    assert "WARNING" not in result.stderr


def test_a_run_on_a_tracking_server_ends_with_its_page_and_its_validation_metrics(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        result = shardprop(
            "train",
            "--workers",
            0,
            "--set",
            "data.synthetic.rows=1000",
            "--set",
            "data.validation_fraction=0.2",
            "--set",
            "train.steps=20",
            "--tracking-uri",
            server.uri,
            "--experiment",
            "pages",
            "--output",
            tmp_path / "out",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        run_id = json.loads((tmp_path / "out" / "metrics.json").read_text())["run_id"]
        experiment_id = MlflowClient(server.uri).get_run(run_id).info.experiment_id
    finally:
        server.stop()
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"run {run_id}: loss ")
    for name in ("accuracy", "val_loss", "val_accuracy", "val_f1", "val_roc_auc"):
        assert f" {name} " in lines[0], lines[0]
    page = f"{server.uri}/#/experiments/{experiment_id}/runs/{run_id}"
    assert lines[-1] == f"see it in the MLflow UI: {page}"
