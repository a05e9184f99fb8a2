"""Property: whatever a user puts in a config or a table, `shardprop train` either trains or
ends with exit code 2 and one line per problem; never a traceback, never exit code 1."""

import tempfile

import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.data.plan import write_table

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
KEYS = {
    "data": [
        "path",
        "synthetic",
        "label",
        "features",
        "task",
        "validation_fraction",
        "standardize",
        "filesystem",
        "bogus",
    ],
    "model": ["hidden", "activation", "init", "dtype", "depth"],
    "train": [
        "steps",
        "learning_rate",
        "optimizer",
        "momentum",
        "l2",
        "seed",
        "checkpoint_every",
        "eval_every",
        "patience",
        "divergence_factor",
        "lr",
    ],
    "cluster": [
        "workers",
        "cpus_per_worker",
        "max_worker_failures",
        "start_timeout",
        "step_timeout",
        "inject_failure",
    ],
    "tracking": ["enabled", "experiment", "run_name"],
    "extra": ["anything"],
}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["relu", "moons", "adam", "float32", "binary", "y"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["name", "rows", "seed", "x"]), scalars, max_size=3),
)
configs = st.dictionaries(
    st.sampled_from(sorted(KEYS)),
    st.one_of(
        scalars,
        st.dictionaries(
            st.sampled_from([key for keys in KEYS.values() for key in keys]), values, max_size=4
        ),
    ),
    max_size=4,
)


def train(tmp_path, config_text: str, *extra: str):
    path = tmp_path / "fuzz.yaml"
    path.write_text(config_text)
    return CliRunner().invoke(
        app,
        [
            "train",
            str(path),
            "--workers",
            "0",
            "--no-tracking",
            "--quiet",
            "--output",  # a folder per example: a folder holds one run's outputs
            tempfile.mkdtemp(dir=tmp_path),
            *extra,
        ],
    )


def assert_trained_or_refused(result):
    """Trained (0), refused in one line per problem (2), or diverged, which a table with
    labels near 1e50 may well do, told in one line (1)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.output,
        result.exception,
    )
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert "failed: training diverged at step" in result.output, result.output
    if result.exit_code == 2:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines and all(line.startswith("error: ") for line in lines), result.output


@SETTINGS
@given(config=configs)
def test_any_config_trains_or_is_refused_in_plain_words(tmp_path, config):
    # small enough to train in a blink when the fuzzed config happens to be valid
    text = yaml.safe_dump(config) + "\n"
    result = train(tmp_path, text, "--set", "train.steps=2", "--set", "data.synthetic.rows=40")
    assert_trained_or_refused(result)


cells = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["a", "b", ""]),
    st.booleans(),
)


@st.composite
def tables(draw):
    rows = draw(st.integers(0, 12))
    columns = {}
    for name in ["x0", "x1", "y"][: draw(st.integers(1, 3))]:
        kind = draw(st.sampled_from(["float", "int", "str", "bool", "mixed"]))
        if kind == "float":
            column = draw(
                st.lists(
                    st.floats(allow_nan=True, allow_infinity=True) | st.none(),
                    min_size=rows,
                    max_size=rows,
                )
            )
            columns[name] = pa.array(column, pa.float64())
        elif kind == "int":
            column = draw(st.lists(st.integers(-2, 2) | st.none(), min_size=rows, max_size=rows))
            columns[name] = pa.array(column, pa.int64())
        elif kind == "str":
            column = draw(
                st.lists(st.sampled_from(["a", "b", "c"]) | st.none(), min_size=rows, max_size=rows)
            )
            columns[name] = pa.array(column, pa.string())
        elif kind == "bool":
            columns[name] = pa.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
        else:
            cells_ = draw(st.lists(cells, min_size=rows, max_size=rows))
            columns[name] = pa.array([None if c is None else str(c) for c in cells_])
    return pa.table(columns)


@pytest.mark.filterwarnings("error:overflow encountered:RuntimeWarning")
@SETTINGS
@given(table=tables(), task=st.sampled_from(["auto", "binary", "multiclass", "regression"]))
@example(  # squared deviations overflow: the statistics must not warn about it
    table=pa.table({"x0": [4.9e204, -4.9e204, 1.0, 2.0], "y": [0, 1, 0, 1]}), task="auto"
)
def test_any_small_table_trains_or_is_refused_in_plain_words(tmp_path, table, task):
    data = write_table(table, tmp_path / "fuzz.parquet")
    config = f"data: {{path: {data}, task: {task}}}\ntrain: {{steps: 2}}\n"
    assert_trained_or_refused(train(tmp_path, config))


def test_the_check_catches_a_crash():
    """The property's check is not vacuous: an uncaught exception fails it."""
    import pytest
    import typer

    crashing = typer.Typer()

    @crashing.command()
    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(AssertionError):
        assert_trained_or_refused(CliRunner().invoke(crashing, []))
