"""Real tables: text, dictionary and boolean columns, missing values, targets in thousands.

Whole runs on real Parquet files: the same bits for any worker count, the encoding checked
against scikit-learn's, the MLflow model predicting from raw columns, and the lines a user
reads when the data needs a decision.
"""

import json
import logging
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.config import load_config
from shardprop.service.data.datasets import make_dataset
from shardprop.service.data.plan import write_table
from shardprop.service.tracking.serving import load_bundle, predict_frame
from shardprop.service.training.run import train
from shardprop.workers.network.backprop import Architecture, Network

ROWS = 1001
COLORS = ["red", "green", "blue", "amber", "teal"]


def mixed_table(rows: int = ROWS, seed: int = 0) -> pa.Table:
    """Numbers with NaN and nulls, text with nulls, a dictionary, booleans, an integer code,
    a timestamp (left out), and two labels: a price in the thousands and a yes/no."""
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=rows)
    x1 = rng.integers(0, 50, rows) + 1000
    color = rng.choice(COLORS, rows)
    size = rng.choice(["S", "M", "L"], rows)
    flag = rng.random(rows) < 0.3
    grade = rng.integers(1, 4, rows)
    signal = (
        x0
        + 0.05 * (x1 - 1025)
        + np.select([color == "red", color == "blue"], [1.5, -1.0], 0.0)
        + np.where(flag, 0.8, 0.0)
        + 0.5 * grade
        + np.where(size == "L", 0.7, 0.0)
    )
    price = 5000 + 1000 * signal + rng.normal(scale=50, size=rows)
    x0_values = [None if i % 97 == 5 else float(v) for i, v in enumerate(x0)]
    x0_values[11] = float("nan")
    color_values = [None if i % 89 == 3 else str(v) for i, v in enumerate(color)]
    return pa.table(
        {
            "x0": pa.array(x0_values, pa.float64()),
            "x1": pa.array(x1, pa.int64()),
            "const": pa.array(np.full(rows, 0.1)),
            "color": pa.array(color_values, pa.string()),
            "size": pa.array(size).dictionary_encode(),
            "flag": pa.array(flag),
            "grade": pa.array(grade, pa.int64()),
            "when": pa.array(np.arange(rows).astype("datetime64[s]")),
            "price": pa.array(price),
            "pricey": pa.array(np.where(signal > np.median(signal), "yes", "no")),
        }
    )


@pytest.fixture(scope="module")
def table_folder(tmp_path_factory):
    """The table as three Parquet files of uneven sizes, small row groups."""
    folder = tmp_path_factory.mktemp("mixed")
    table = mixed_table()
    for part, (lo, hi) in enumerate([(0, 300), (300, 777), (777, ROWS)]):
        write_table(table.slice(lo, hi - lo), folder / f"part-{part}.parquet", 128)
    return folder


def mixed_config(folder, label: str, *sets: str, workers: int = 0, **flags):
    overrides = [
        f"data.path={folder}",
        f"data.label={label}",
        "data.features=[x0, x1, const, color, size, flag, grade]",
        "data.categorical=[grade]",
        "data.validation_fraction=0.2",
        "model.hidden=[16]",
        "train.steps=25",
        "train.optimizer=adam",
        "train.learning_rate=0.02",
        "train.reduction=exact",
        "train.block_rows=64",
        "train.checkpoint_every=0",
        *sets,
    ]
    flags = {"cluster.workers": workers, "tracking.enabled": False} | flags
    return load_config(None, overrides, flags)


CASES = {
    "regression, impute, standardised target": ("price", "data.missing=impute"),
    "binary, drop": ("pricey", "data.missing=drop"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_exact_weights_are_bitwise_equal_for_workers_0_1_2_3_on_a_mixed_table(
    ray_session, table_folder, case
):
    label, *sets = CASES[case]
    reference = train(mixed_config(table_folder, label, *sets, workers=0))
    assert reference.history["loss"][-1] < reference.history["loss"][0]
    for workers in (1, 2, 3):
        result = train(mixed_config(table_folder, label, *sets, workers=workers))
        assert np.array_equal(result.theta, reference.theta), f"{workers} workers"
        assert result.final == reference.final, f"{workers} workers"
        assert result.setup.columns == reference.setup.columns


def sklearn_inputs(frame: pd.DataFrame, levels: dict, numeric: list[str]) -> np.ndarray:
    """The inputs as scikit-learn builds them: mean-imputed, standardised numbers, then
    one-hot categories (a missing level where training had missing values)."""
    frame = frame.copy()
    categorical = list(levels)
    for name in categorical:
        frame[name] = frame[name].astype(object).where(frame[name].notna(), "(missing)")
    encoder = OneHotEncoder(
        categories=[
            ["(missing)" if level is None else level for level in levels[name]]
            for name in categorical
        ],
        handle_unknown="ignore",
        sparse_output=False,
    )
    numbers = make_pipeline(SimpleImputer(strategy="mean"), StandardScaler())
    transform = ColumnTransformer([("n", numbers, numeric), ("c", encoder, categorical)])
    return transform.fit(frame).transform(frame)


def load_logged_model(uri: str, run_id: str):
    """runs:/RUN/model from the store at `uri`; the process's tracking URI and import path
    left as they were (load_model reads the first and prepends the model's code to the
    second)."""
    saved_sys_path = list(sys.path)
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
        sys.path[:] = saved_sys_path


def test_inputs_targets_and_the_mlflow_model_agree_with_scikit_learn(
    new_store, tmp_path, table_folder
):
    """Encoded and standardised as scikit-learn's ColumnTransformer would, the targets as its
    StandardScaler, and the logged MLflow model predicts from raw rows, missing values and a
    level never seen included, what the network computes on scikit-learn's inputs."""
    uri = new_store(tmp_path)
    config = mixed_config(
        table_folder,
        "price",
        "data.missing=impute",
        "data.validation_fraction=0",
        **{"tracking.enabled": True, "tracking.uri": uri},
    )
    result = train(config, output=tmp_path / "out")
    frame = mixed_table().to_pandas()
    features = ["x0", "x1", "const", "color", "size", "flag", "grade"]
    frame["size"] = frame["size"].astype(str)
    columns = result.setup.columns
    numeric = [c.name for c in columns if c.kind == "numeric"]
    levels = {c.name: list(c.levels) for c in columns if c.kind == "categorical"}
    assert levels["color"] == [*sorted(COLORS), None] and levels["grade"] == [1, 2, 3]
    assert levels["flag"] == [False, True] and levels["size"] == ["L", "M", "S"]
    X = sklearn_inputs(frame[features], levels, numeric).T  # (n0, m)
    assert result.arch.sizes[0] == X.shape[0] == 3 + 6 + 3 + 2 + 3

    # a constant column counts as one (scaled by 1, centred) as StandardScaler decides
    model = json.loads((tmp_path / "out" / "model.json").read_text())
    const = numeric.index("const")
    assert model["std"][const] == 1.0 and abs(model["mean"][const] - 0.1) < 1e-15
    target = StandardScaler().fit(frame[["price"]])
    np.testing.assert_allclose(model["target"], [target.mean_[0], target.scale_[0]], rtol=1e-12)

    network = Network(Architecture(result.arch.sizes, "relu", "regression"))
    expected = network.predict(result.theta, X)[0] * model["target"][1] + model["target"][0]
    raw = frame[features].copy()
    raw.loc[3, "color"] = "violet"  # never seen: all zeros, like scikit-learn's "ignore"
    X_unseen = sklearn_inputs(raw, levels, numeric).T[:, :200]
    expected_unseen = network.predict(result.theta, X_unseen)[0] * model["target"][1]
    expected_unseen += model["target"][0]
    loaded = load_logged_model(uri, result.run_id)
    np.testing.assert_allclose(loaded.predict(raw.head(200)), expected_unseen, rtol=1e-9)
    out = tmp_path / "out"
    local = predict_frame(load_bundle(out / "weights.npz", out / "model.json"), frame[features])
    np.testing.assert_allclose(local, expected, rtol=1e-9)
    # r2 and rmse as scikit-learn computes them from the same predictions, in dollars
    assert result.final["r2"] == pytest.approx(r2_score(frame["price"], expected), abs=1e-9)
    rmse = float(np.sqrt(np.mean((frame["price"] - expected) ** 2)))
    assert result.final["rmse"] == pytest.approx(rmse, rel=1e-9)


def test_a_level_never_seen_in_training_is_counted(tmp_path, table_folder, caplog):
    config = mixed_config(table_folder, "pricey", "data.missing=impute")
    result = train(config, output=tmp_path / "out")
    bundle = load_bundle(tmp_path / "out" / "weights.npz", tmp_path / "out" / "model.json")
    rows = mixed_table().to_pandas().head(5)
    rows["size"] = ["S", "XL", "XL", "M", "L"]
    with caplog.at_level(logging.WARNING):
        predicted = predict_frame(bundle, rows)
    assert "'size': 2 value(s) not seen in training" in caplog.text
    assert np.isfinite(predicted).all()
    assert 0.5 <= result.final["val_roc_auc"] <= 1.0


def test_rare_levels_become_other_when_asked(tmp_path, table_folder):
    config = mixed_config(
        table_folder,
        "pricey",
        "data.missing=drop",
        "data.max_categories=3",
        "data.categories_over_max=other",
    )
    result = train(config, output=tmp_path / "out")
    color = next(c for c in result.setup.columns if c.name == "color")
    assert color.other and len(color.levels) == 2
    bundle = load_bundle(tmp_path / "out" / "weights.npz", tmp_path / "out" / "model.json")
    rows = mixed_table().to_pandas().head(3).assign(color="violet")
    assert np.isfinite(predict_frame(bundle, rows)).all()


def test_binary_metrics_match_scikit_learn(tmp_path, table_folder):
    config = mixed_config(table_folder, "pricey", "data.missing=drop", "data.validation_fraction=0")
    result = train(config, output=tmp_path / "out")
    frame = mixed_table().to_pandas()
    bundle = load_bundle(tmp_path / "out" / "weights.npz", tmp_path / "out" / "model.json")
    kept = frame[["x0", "color"]].notna().all(axis=1)
    frame = frame[kept]
    scores = predict_frame(bundle, frame)
    assert result.final["rows"] == len(frame)
    assert result.setup.dropped == ROWS - len(frame)
    truth = frame["pricey"] == "yes"
    assert result.final["roc_auc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    matrix = json.loads((tmp_path / "out" / "confusion" / "confusion_train.json").read_text())
    assert matrix["classes"] == ["no", "yes"]
    assert sum(map(sum, matrix["matrix"])) == len(frame)


def linear_table(scale: float, offset: float) -> pa.Table:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(2000, 4))
    y = (
        X @ np.array([1.0, -2.0, 0.5, 0.0]) * scale
        + offset
        + rng.normal(scale=0.01 * scale, size=2000)
    )
    return pa.table({**{f"x{i}": X[:, i] for i in range(4)}, "y": y})


@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (1000.0, 5000.0)])
def test_regression_trains_with_the_default_settings(tmp_path, scale, offset):
    """Unit-scale targets and targets in the thousands, with the default learning rate."""
    table = linear_table(scale, offset)
    write_table(table, tmp_path / "linear.parquet")
    config = load_config(
        None,
        [f"data.path={tmp_path / 'linear.parquet'}", "data.task=regression"],
        {"cluster.workers": 0, "tracking.enabled": False},
    )
    result = train(config, output=tmp_path / "out")
    assert result.final["r2"] > 0.97
    # in the label's units: rmse^2 = (1 - r2) var(y) over the same rows
    variance = float(np.var(table["y"].to_numpy()))
    rmse = np.sqrt((1 - result.final["r2"]) * variance)
    assert result.final["rmse"] == pytest.approx(rmse, rel=1e-6)


def cli(*args: str):
    result = CliRunner().invoke(app, [*args])
    return result.exit_code, result.output


def test_task_auto_says_what_it_decided_and_plan_reports_the_columns(tmp_path, table_folder):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data: {{path: {table_folder}, label: pricey, missing: impute}}\n"
        "train: {steps: 2, checkpoint_every: 0}\n"
    )
    code, output = cli("train", str(config), "--workers", "0", "--no-tracking")
    assert code == 0, output
    assert "data.task auto: binary, as label 'pricey' holds text, 2 distinct values" in output
    assert "color (categorical, 5 levels + missing)" in output
    assert "when (type timestamp[ms] is neither a number nor a category)" in output
    code, output = cli("plan", str(config))
    assert code == 0, output
    assert "price (numeric)" in output and "-> 16 inputs" in output  # 5 numbers, 11 levels
    assert "network: 16 -> 32 -> 32 -> 1" in output


def test_auto_with_hundreds_of_whole_number_classes_asks_for_the_task(tmp_path):
    rng = np.random.default_rng(0)
    rounded = pa.table({"x": rng.normal(size=2000), "y": rng.integers(0, 258, 2000)})
    write_table(rounded, tmp_path / "prices.parquet")
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {{path: {tmp_path / 'prices.parquet'}}}\n")
    code, output = cli("train", str(config), "--workers", "0", "--no-tracking")
    assert code == 2, output
    assert "Traceback" not in output
    assert "258 classes" in output and "data.task: regression" in output


# the two example tables and their configs ---------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def example(name: str, folder: Path, *sets: str):
    """configs/NAME.yaml on `data make NAME`'s file, in-process and untracked."""
    data = folder / f"{name}.parquet"
    make_dataset(name, data)
    flags = {"cluster.workers": 0, "tracking.enabled": False}
    return load_config(CONFIGS / f"{name}.yaml", [f"data.path={data}", *sets], flags)


def test_the_penguins_example_learns_from_text_columns_and_missing_values(tmp_path):
    result = train(example("penguins", tmp_path), output=tmp_path / "species")
    assert result.setup.task == "multiclass" and result.final["val_accuracy"] >= 0.95
    # body mass from the same table: its text columns (species, island, sex) add what they know
    mass = ("data.label=body_mass_g", "data.task=regression", "data.missing=drop")
    numbers = "data.features=[bill_length_mm, bill_depth_mm, flipper_length_mm]"
    with_text = train(example("penguins", tmp_path, *mass), output=tmp_path / "all")
    numbers_only = train(example("penguins", tmp_path, *mass, numbers), output=tmp_path / "num")
    assert with_text.final["val_r2"] > numbers_only.final["val_r2"] + 0.02


def test_the_diabetes_example_trains_a_regression_in_the_targets_units(tmp_path):
    result = train(example("diabetes", tmp_path), output=tmp_path / "out")
    assert result.final["val_r2"] > 0.3
    assert 30 < result.final["val_rmse"] < 80  # disease progression units, not standardised
