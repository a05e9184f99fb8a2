"""`shardprop predict`: every worker count predicts what the logged MLflow model predicts, in
input order, from every form of MODEL, on real Parquet, CSV and Feather files and a real
table with text and missing values; bad input ends in one line and exit 2.

Real Ray (the session's local runtime), a real sqlite MLflow store with a registered model,
real files; the reference is mlflow.pyfunc's predict on the same rows from a pandas frame.
"""

import logging
import os
import signal
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.config import load_config
from shardprop.service.data.datasets import make_dataset
from shardprop.service.data.plan import write_table
from shardprop.service.scoring.batch import predict
from shardprop.service.training.run import train
from shardprop.workers.data.synthetic import SyntheticSpec, generate

ROWS = 2_500
COLORS = np.array(["red", "green", "blue"])  # the labels, as text: the original labels come back
FEATURES = [f"x{i}" for i in range(6)]
REGISTERED = "blobs-colors"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def blobs_table(rows: int = ROWS) -> pa.Table:
    """Three blobs in six features, the class as a colour, and an id to keep."""
    table = generate(SyntheticSpec("blobs", rows, features=6, classes=3, seed=3), 0, rows)
    colors = COLORS[table.column("y").to_numpy()]
    return (
        table.drop_columns("y")
        .append_column("color", pa.array(colors))
        .append_column("id", pa.array(np.arange(rows) * 7 + 1000))
    )


def load_pyfunc(uri: str, model: str) -> mlflow.pyfunc.PyFuncModel:
    """The logged model as MLflow loads it; the process's tracking URI and path left as
    they were (load_model prepends the model's code to sys.path)."""
    saved = list(sys.path)
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model)
    finally:
        mlflow.set_tracking_uri(None)
        sys.path[:] = saved


@pytest.fixture(scope="module")
def trained(new_store, tmp_path_factory):
    """The table as three Parquet files of uneven sizes and small row groups; a multiclass
    model trained on it, logged in a sqlite store and registered (version 1, alias champion)."""
    folder = tmp_path_factory.mktemp("predict")
    table = blobs_table()
    data = folder / "data"
    for part, (lo, hi) in enumerate([(0, 700), (700, 1901), (1901, ROWS)]):
        write_table(table.slice(lo, hi - lo), data / f"part-{part}.parquet", 128)
    uri = new_store(folder)
    config = load_config(
        None,
        [
            f"data.path={data}",
            "data.label=color",
            f"data.features=[{', '.join(FEATURES)}]",
            "model.hidden=[16, 8]",
            "train.steps=20",
            "train.optimizer=adam",
            "train.learning_rate=0.05",
            "train.checkpoint_every=0",
        ],
        {"cluster.workers": 0, "tracking.uri": uri, "tracking.experiment": "predict"},
    )
    result = train(config, output=folder / "out")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        version = mlflow.register_model(f"runs:/{result.run_id}/model", REGISTERED)
        mlflow.MlflowClient(uri).set_registered_model_alias(REGISTERED, "champion", version.version)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    pyfunc = load_pyfunc(uri, f"runs:/{result.run_id}/model")
    frame = table.to_pandas()
    return {
        "folder": folder,
        "data": data,
        "uri": uri,
        "run_id": result.run_id,
        "output": folder / "out",
        "table": table,
        "probabilities": pyfunc.predict(frame[FEATURES]),
        "labels": pyfunc.predict(frame[FEATURES], params={"output": "labels"}),
    }


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args])
    return result.exit_code, result.output


def probabilities(path: Path) -> np.ndarray:
    table = pq.read_table(path)
    return np.column_stack([table[f"probability_{c}"].to_numpy() for c in sorted(COLORS)])


def test_predictions_of_0_1_2_3_workers_equal_mlflow_pyfunc_in_input_order(
    ray_session, trained, tmp_path
):
    """Slices of 300 rows cross row groups and files; every worker count, the same rows in
    the same order as the input, the same probabilities as the logged model's (1e-12)."""
    want = trained["probabilities"]
    assert list(want.columns) == sorted(COLORS)
    for workers in (0, 1, 2, 3):
        out = tmp_path / f"scored-{workers}.parquet"
        scored = predict(
            trained["run_id"],
            str(trained["data"]),
            out,
            keep=["id"],
            workers=workers,
            tracking_uri=trained["uri"],
            slice_rows=300,
        )
        assert scored.rows == ROWS and scored.workers == workers
        table = pq.read_table(out)
        assert table.column_names == [*(f"probability_{c}" for c in sorted(COLORS)), "id"]
        assert table["id"].equals(trained["table"]["id"]), f"{workers} workers: row order"
        np.testing.assert_allclose(probabilities(out), want.to_numpy(), rtol=0, atol=1e-12)
    assert not list(tmp_path.glob(".shardprop-predict-*")), "part files left behind"


def test_every_form_of_model_gives_the_same_predictions(trained, tmp_path):
    """A run id, runs:/RUN/model, models:/NAME/1, models:/NAME@alias and the output folder."""
    run_id = trained["run_id"]
    forms = [
        run_id,
        f"runs:/{run_id}/model",
        f"models:/{REGISTERED}/1",
        f"models:/{REGISTERED}@champion",
        str(trained["output"]),
    ]
    for i, model in enumerate(forms):
        out = tmp_path / f"form-{i}.parquet"
        predict(model, str(trained["data"]), out, workers=0, tracking_uri=trained["uri"])
        np.testing.assert_allclose(
            probabilities(out), trained["probabilities"].to_numpy(), rtol=0, atol=1e-12
        )


def test_labels_are_the_original_labels_with_the_columns_kept(trained, tmp_path):
    out = tmp_path / "labels.parquet"
    code, output = cli(
        "predict",
        str(trained["output"]),
        str(trained["data"]),
        "--out",
        str(out),
        "--kind",
        "labels",
        "--keep",
        "id,x0",
        "--workers",
        "0",
        "--batch-rows",
        "97",
    )
    assert code == 0, output
    table = pq.read_table(out)
    assert table.column_names == ["prediction", "id", "x0"]
    assert table["prediction"].type == pa.string()
    assert table["prediction"].to_pylist() == list(trained["labels"])
    assert set(table["prediction"].to_pylist()) <= set(COLORS)
    assert table["x0"].equals(trained["table"]["x0"])
    assert f"wrote {ROWS:,} rows to {out}" in output


def test_csv_and_feather_inputs_give_the_parquet_predictions(trained, tmp_path):
    """The workers stream each format slice by slice: the same rows, the same predictions."""
    table = trained["table"]
    for suffix in ("csv", "feather"):
        folder = tmp_path / suffix
        for part, (lo, hi) in enumerate([(0, 1234), (1234, ROWS)]):
            write_table(table.slice(lo, hi - lo), folder / f"part-{part}.{suffix}", 200)
        out = tmp_path / f"{suffix}.parquet"
        predict(str(trained["output"]), str(folder), out, keep=["id"], workers=0, slice_rows=333)
        assert pq.read_table(out)["id"].to_pylist() == table["id"].to_pylist()
        np.testing.assert_allclose(
            probabilities(out), trained["probabilities"].to_numpy(), rtol=0, atol=1e-12
        )


@pytest.mark.slow
def test_the_penguins_table_with_text_and_missing_values(new_store, ray_session, tmp_path):
    """Strings one-hot, missing numbers and a missing sex imputed (configs/penguins.yaml), on
    2 workers: what the logged model predicts from the same raw rows, labels as species; and
    a model trained with data.missing: drop predicts NaN and no label for a row it cannot
    read, as the served model does."""
    data = tmp_path / "penguins.parquet"
    make_dataset("penguins", data)
    uri = new_store(tmp_path)
    frame = pd.read_parquet(data)
    assert frame.isna().any().any()
    for missing in ("impute", "drop"):
        config = load_config(
            CONFIGS / "penguins.yaml",
            [f"data.path={data}", f"data.missing={missing}", "train.steps=30"],
            {"cluster.workers": 0, "tracking.uri": uri, "train.checkpoint_every": 0},
        )
        run = train(config, output=tmp_path / missing)
        pyfunc = load_pyfunc(uri, f"runs:/{run.run_id}/model")
        features = list(pyfunc.metadata.get_input_schema().input_names())
        out = tmp_path / f"{missing}.parquet"
        code, output = cli(
            "predict", run.run_id, str(data), "--out", str(out), "--tracking-uri", uri,
            "--keep", "species", "--workers", "2", "--batch-rows", "50",
        )  # fmt: skip
        assert code == 0, output
        table = pq.read_table(out)
        want = pyfunc.predict(frame[features])
        got = np.column_stack([table[f"probability_{c}"].to_numpy() for c in want.columns])
        np.testing.assert_allclose(got, want.to_numpy(), rtol=0, atol=1e-12)
        assert table["species"].to_pylist() == frame["species"].to_list()
        unreadable = np.isnan(got).any(axis=1)
        assert unreadable.any() == (missing == "drop")
        labels = tmp_path / f"{missing}-labels.parquet"
        predict(run.run_id, str(data), labels, kind="labels", workers=0, tracking_uri=uri)
        named = pq.read_table(labels)["prediction"]
        assert named.is_null().to_numpy(zero_copy_only=False).tolist() == unreadable.tolist()
        served = pyfunc.predict(frame[features], params={"output": "labels"})
        readable = ~unreadable
        served = np.asarray(served, dtype=object)[readable].tolist()
        assert np.asarray(named.to_pylist(), dtype=object)[readable].tolist() == served


def test_quiet_prints_nothing_and_a_log_gets_lines(trained, tmp_path):
    out = tmp_path / "quiet.parquet"
    args = ["predict", str(trained["output"]), str(trained["data"]), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--workers", "0", "--quiet"])
    assert result.exit_code == 0 and result.output == "", result.output
    code, output = cli(*args, "--workers", "0", "--batch-rows", "500")
    assert code == 0, output
    assert f"scoring {ROWS:,} rows, in-process" in output
    assert f"{ROWS:,}/{ROWS:,} rows" in output


def test_a_regression_model_predicts_values_in_the_labels_units(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(800, 3))
    price = 5000 + 1000 * (X @ np.array([1.0, -0.5, 0.25])) + rng.normal(scale=10, size=800)
    write_table(pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "y": price}), tmp_path / "t.pq")
    config = load_config(
        None,
        [f"data.path={tmp_path / 't.pq'}", "data.task=regression", "train.steps=200"],
        {"cluster.workers": 0, "tracking.enabled": False},
    )
    result = train(config, output=tmp_path / "out")
    out = tmp_path / "values.parquet"
    scored = predict(str(tmp_path / "out"), str(tmp_path / "t.pq"), out, workers=0)
    assert scored.columns == ("prediction",)
    values = pq.read_table(out)["prediction"].to_numpy()
    rmse = np.sqrt(np.mean((values - price) ** 2))
    assert rmse == pytest.approx(result.final["rmse"], rel=1e-9)
    code, output = cli("predict", str(tmp_path / "out"), str(tmp_path / "t.pq"), "--out",
                       str(out), "--kind", "labels", "--workers", "0")  # fmt: skip
    assert code == 2 and output == "error: --kind labels: a regression model predicts values\n"


def bad(trained, tmp_path, *args: str, data: str | None = None) -> str:
    """The command's output, which must be one error line and exit 2, without a traceback."""
    out = tmp_path / "bad.parquet"
    model = str(trained["output"])
    code, output = cli(
        "predict", *(args or (model,)), data or str(trained["data"]), "--out", str(out),
        "--workers", "0", "--tracking-uri", trained["uri"],
    )  # fmt: skip
    assert code == 2, output
    assert "Traceback" not in output and output.count("\n") == 1, output
    assert output.startswith("error: ")
    assert not out.exists()
    return output


def test_bad_input_ends_in_one_line_and_exit_2(trained, tmp_path):
    no_x3 = tmp_path / "no-x3.parquet"
    write_table(trained["table"].drop_columns("x3"), no_x3)
    assert "no feature column(s) 'x3'" in bad(trained, tmp_path, data=str(no_x3))
    text = tmp_path / "text-x0.parquet"
    write_table(trained["table"].set_column(0, "x0", pa.array(["a"] * ROWS)), text)
    assert "feature column 'x0' has type string" in bad(trained, tmp_path, data=str(text))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    assert "garbage.parquet: not a readable parquet file" in bad(
        trained, tmp_path, data=str(garbage)
    )
    assert "no such file or folder" in bad(trained, tmp_path, data=str(tmp_path / "nope.pq"))
    model = str(trained["output"])
    assert "--kind 'odds': expected one of" in bad(trained, tmp_path, model, "--kind", "odds")
    assert "--keep: no column 'ident'" in bad(trained, tmp_path, model, "--keep", "ident")
    assert "MODEL nowhere: no such folder" in bad(trained, tmp_path, "nowhere")
    assert "MODEL models:/nothing/1" in bad(trained, tmp_path, "models:/nothing/1")
    assert f"MODEL models:/{REGISTERED}@gone" in bad(
        trained, tmp_path, f"models:/{REGISTERED}@gone"
    )
    assert "MODEL runs:/" in bad(trained, tmp_path, "0" * 32)
    assert "has no weights.npz" in bad(trained, tmp_path, str(tmp_path))


def test_a_worker_that_finds_bad_data_stops_the_run_in_one_line(ray_session, trained, tmp_path):
    """A categorical column whose values cannot be the model's levels: found by a Ray worker
    while it reads, told as the same one line, exit 2; no file and no part file left."""
    table = pa.table({"flag": pa.array([True, False] * 200), "y": pa.array([1.0, 0.0] * 200)})
    write_table(table, tmp_path / "train.parquet")
    config = load_config(
        None,
        [f"data.path={tmp_path / 'train.parquet'}", "train.steps=2"],
        {"cluster.workers": 0, "tracking.enabled": False},
    )
    train(config, output=tmp_path / "out")
    write_table(pa.table({"flag": pa.array(["maybe"] * 400)}), tmp_path / "score.parquet")
    out = tmp_path / "scored.parquet"
    code, output = cli("predict", str(tmp_path / "out"), str(tmp_path / "score.parquet"),
                       "--out", str(out), "--workers", "2")  # fmt: skip
    assert code == 2 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == ["error: column 'flag' has type string; the model reads its levels as bool"]
    assert not out.exists() and not list(tmp_path.glob(".shardprop-predict-*"))


class KillOneWorker:
    """Progress that, once a quarter of the rows are written, kills a scoring worker's process
    as `kill -9` would."""

    def __init__(self, ray):
        self.ray = ray
        self.killed: list[int] = []

    def start(self, total_rows: int, workers: int) -> None:
        self.total = total_rows

    def rows(self, done: int, rows_per_second: float) -> None:
        from ray.util.state import list_actors

        if self.killed or done < self.total // 4:
            return
        alive = list_actors(
            address=self.ray.dashboard_address,
            filters=[("class_name", "=", "ScoringWorker"), ("state", "=", "ALIVE")],
        )
        pid = min(actor.pid for actor in alive)
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)

    def stop(self) -> None:
        pass


def test_a_worker_killed_mid_run_is_replaced_and_the_file_is_the_same(
    ray_session, trained, tmp_path, caplog
):
    out = tmp_path / "scored.parquet"
    killer = KillOneWorker(ray_session)
    with caplog.at_level(logging.WARNING):
        scored = predict(
            str(trained["output"]),
            str(trained["data"]),
            out,
            keep=["id"],
            workers=2,
            progress=killer,
            slice_rows=50,
        )
    assert killer.killed and "lost" in caplog.text and "replacing it" in caplog.text
    assert scored.rows == ROWS
    assert pq.read_table(out)["id"].equals(trained["table"]["id"])
    np.testing.assert_allclose(
        probabilities(out), trained["probabilities"].to_numpy(), rtol=0, atol=1e-12
    )
