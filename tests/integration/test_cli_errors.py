"""Bad input ends with exit code 2 and one line naming the problem, never a traceback."""

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.data.plan import write_table
from shardprop.workers.network.params import Layout, init_params, save_weights


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "x0": rng.standard_normal(50),
            "x1": rng.standard_normal(50),
            "city": ["paris"] * 50,
            "y": rng.integers(0, 2, 50),
        }
    )


@pytest.fixture
def config(tmp_path, table):
    data = write_table(table, tmp_path / "train.parquet")
    path = tmp_path / "config.yaml"
    path.write_text(
        f"data: {{path: {data}, features: [x0, x1]}}\n"
        "train: {steps: 3, checkpoint_every: 0}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
    )
    return path


def invoke(*args):
    result = CliRunner().invoke(app, ["train", *map(str, args)])
    return result.exit_code, result.output.strip()


def assert_one_line_error(code, output, *fragments):
    assert code == 2, output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, output
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_missing_config_file(tmp_path):
    assert_one_line_error(*invoke(tmp_path / "nope.yaml"), "nope.yaml", "not found")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.learnig_rate=0.1", ["train.learnig_rate", "did you mean 'train.learning_rate'"]),
        ("train.steps=lots", ["train.steps", "valid integer"]),
        ("train.learning_rate=0", ["train.learning_rate", "greater than 0"]),
        ("train.learning_rate=-0.5", ["train.learning_rate", "greater than 0"]),
        ("train.steps=0", ["train.steps", "greater than 0"]),
        ("train.optimizer=bfgs", ["train.optimizer", "'lbfgs'"]),
        ("train.schedule=step", ["train.decay_every"]),
        ("train.schedule=linear", ["train.schedule", "'cosine'"]),
    ],
)
def test_bad_config_values(config, override, fragments):
    assert_one_line_error(*invoke(config, "--set", override, "--workers", 0), *fragments)


def test_missing_label_column(config):
    code, output = invoke(config, "--set", "data.label=target", "--workers", 0)
    assert_one_line_error(code, output, "'target'")


def test_missing_feature_column(config):
    code, output = invoke(config, "--set", "data.features=[x0, x9]", "--workers", 0)
    assert_one_line_error(code, output, "'x9'")


def test_a_categorical_column_over_the_cap_names_it_and_its_count(tmp_path, config, table):
    cities = pa.array([f"city-{i % 7}" for i in range(table.num_rows)])
    write_table(table.set_column(2, "city", cities), tmp_path / "train.parquet")
    code, output = invoke(config, "--set", "data.features=null", "--set", "data.max_categories=5")
    assert_one_line_error(code, output, "'city'", "7 categories", "data.max_categories 5")


def test_an_unknown_missing_value_mode_names_the_key(config):
    code, output = invoke(config, "--set", "data.missing=fill", "--workers", 0)
    assert_one_line_error(code, output, "data.missing", "drop")


def test_a_label_with_nulls_names_the_column_and_the_fix(tmp_path, config, table):
    y = pa.array([None if i == 4 else v for i, v in enumerate(table["y"].to_pylist())])
    write_table(table.set_column(3, "y", y), tmp_path / "train.parquet")
    code, output = invoke(config, "--set", "data.missing=impute", "--workers", 0)
    assert_one_line_error(code, output, "label column 'y'", "1 null", "row 4", "data.missing: drop")


def test_nan_in_data_names_column_and_count(tmp_path, config, table):
    x1 = table["x1"].to_numpy().copy()
    x1[[3, 7, 11]] = np.nan
    write_table(table.set_column(1, "x1", pa.array(x1)), tmp_path / "train.parquet")
    code, output = invoke(config, "--workers", 0)
    assert_one_line_error(code, output, "'x1'", "3 missing values", "row 3")


def test_inf_found_by_a_ray_worker_is_reported_the_same_way(ray_session, tmp_path, config, table):
    x0 = table["x0"].to_numpy().copy()
    x0[40] = np.inf
    write_table(table.set_column(0, "x0", pa.array(x0)), tmp_path / "train.parquet")
    code, output = invoke(config, "--workers", 2)
    assert_one_line_error(code, output, "'x0'", "1 infinite", "row 40")


def test_more_workers_than_rows(config):
    assert_one_line_error(*invoke(config, "--workers", 51), "cluster.workers", "51")


def test_init_weights_of_the_wrong_shape(tmp_path, config):
    wrong = save_weights(tmp_path / "w.npz", Layout((2, 5, 1)), np.zeros(Layout((2, 5, 1)).size))
    code, output = invoke(config, "--workers", 0, "--init-weights", wrong)
    assert_one_line_error(code, output, "W1", "(5, 2)", "(32, 2)")


def test_init_weights_that_are_not_a_weights_file(tmp_path, config):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    assert_one_line_error(*invoke(config, "--workers", 0, "--init-weights", junk), "junk.npz")


def test_good_init_weights_are_accepted(tmp_path, config):
    layout = Layout((2, 32, 32, 1))
    good = save_weights(tmp_path / "w.npz", layout, init_params(layout, "he", 5, np.float64))
    code, output = invoke(config, "--workers", 0, "--init-weights", good, "--quiet")
    assert code == 0, output


def test_a_file_whose_schema_differs_is_named_with_its_column(tmp_path, table):
    folder = tmp_path / "parts"
    write_table(table.slice(0, 25), folder / "a.parquet")
    other = table.slice(25).set_column(1, "x1", pa.array(["oops"] * 25))
    write_table(other, folder / "b.parquet")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{path: {folder}, features: [x0, x1]}}\n")
    code, output = invoke(config, "--workers", 0, "--no-tracking")
    assert_one_line_error(code, output, "b.parquet", "x1")


def test_nulls_in_a_feature_are_counted(tmp_path, config, table):
    x0 = pa.array([None if i in (5, 6) else v for i, v in enumerate(table["x0"].to_pylist())])
    write_table(table.set_column(0, "x0", x0), tmp_path / "train.parquet")
    assert_one_line_error(*invoke(config, "--workers", 0), "'x0'", "2 missing values", "row 5")


def test_labels_that_do_not_fit_the_task(tmp_path, config, table):
    labels = pa.array(np.arange(50) % 3)
    write_table(table.set_column(3, "y", labels), tmp_path / "train.parquet")
    code, output = invoke(config, "--workers", 0, "--set", "data.task=binary")
    assert_one_line_error(code, output, "'y'", "3 distinct values", "binary needs exactly two")
    code, output = invoke(
        config,
        "--workers",
        0,
        "--set",
        "data.task=regression",
        "--set",
        "data.label=city",
        "--set",
        "data.features=[x0]",
    )
    assert_one_line_error(code, output, "'city'", "regression needs numbers")


def test_zero_rows(tmp_path, config, table):
    write_table(table.slice(0, 0), tmp_path / "train.parquet")
    assert_one_line_error(*invoke(config, "--workers", 0), "train.parquet", "has no rows")


def test_train_without_a_config_trains_on_the_defaults(tmp_path):
    code, output = invoke(
        "--workers", 0, "--no-tracking", "--set", "train.steps=3", "--output", tmp_path / "out"
    )
    assert code == 0, output
    assert "error" not in output
    final = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert final["rows"] == 20_000  # the default set: two moons, 20,000 rows


def test_a_data_path_given_later_replaces_the_configs_synthetic_set(tmp_path, table):
    data = write_table(table, tmp_path / "train.parquet")
    config = tmp_path / "synthetic.yaml"
    config.write_text("data: {synthetic: {name: circles, rows: 300}, features: [x0, x1]}\n")

    def rows_trained(out, *overrides):
        options = ("--workers", 0, "--no-tracking", "--set", "train.steps=2", "--output", out)
        code, output = invoke(config, *overrides, *options)
        assert code == 0, output
        return json.loads((out / "metrics.json").read_text())["rows"]

    assert rows_trained(tmp_path / "a", "--set", f"data.path={data}") == 50  # the file's
    # and a synthetic set given later replaces a path given earlier
    later = ("--set", f"data.path={data}", "--set", "data.synthetic.rows=120")
    assert rows_trained(tmp_path / "b", *later) == 120


def test_a_path_and_a_synthetic_set_in_one_file_name_both_keys(tmp_path, table):
    data = write_table(table, tmp_path / "train.parquet")
    config = tmp_path / "both.yaml"
    config.write_text(f"data: {{path: {data}, synthetic: {{rows: 300}}}}\n")
    code, output = invoke(config, "--workers", 0, "--no-tracking")
    assert_one_line_error(code, output, "data.path", "data.synthetic", "keep one")
