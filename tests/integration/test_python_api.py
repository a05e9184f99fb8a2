"""Training from Python: a config as a file, a mapping or a Config; rows as a path, a pandas
DataFrame or a pyarrow Table, sharded through Ray's object store. Real Ray and MLflow."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import shardprop.service as shardprop
from shardprop.service.config import load_config
from shardprop.service.data.plan import write_table
from shardprop.service.errors import ConfigError
from shardprop.service.tracking.tracker import recall_run

SETTINGS = {
    "data": {"label": "y", "validation_fraction": 0.2, "missing": "impute"},
    "model": {"hidden": [8]},
    "train": {"steps": 12, "checkpoint_every": 0, "block_rows": 50},
    "tracking": {"enabled": False},
}


def frame(rows: int = 301) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    x = rng.normal(size=rows)
    x[7] = np.nan
    city = rng.choice(["oslo", "lima", "pune"], rows)
    return pd.DataFrame({"x": x, "city": city, "y": (x + (city == "lima") > 0.3).astype(int)})


def test_a_dataframe_trains_to_the_bits_of_the_same_rows_read_from_parquet(
    new_store, ray_session, tmp_path
):
    rows = frame()
    write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "rows.parquet")
    from_file = shardprop.train(
        SETTINGS, data=tmp_path / "rows.parquet", output=tmp_path / "file", **{"cluster.workers": 0}
    )
    tracked = {"tracking.enabled": True, "tracking.uri": new_store(tmp_path)}
    for workers, data in ((2, rows), (3, pa.Table.from_pandas(rows)), (0, rows)):
        flags = tracked if workers == 2 else {}  # the run's input dataset is logged too
        result = shardprop.train(
            SETTINGS,
            data=data,
            output=tmp_path / f"mem-{workers}",
            cluster={"workers": workers},
            **flags,
        )
        assert np.array_equal(result.theta, from_file.theta), f"{workers} workers"
        assert result.final == from_file.final
        if flags:  # the rows are gone with the process: `resume` refuses, naming why
            with pytest.raises(ConfigError, match=r"rows given in memory"):
                recall_run(tracked["tracking.uri"], result.run_id)
    assert [c.name for c in from_file.setup.columns] == ["x", "city"]


@pytest.mark.slow
def test_a_replaced_worker_fetches_its_rows_from_the_object_store_again(ray_session, tmp_path):
    rows = frame()
    reference = shardprop.train(SETTINGS, data=rows, output=tmp_path / "ref")
    flags = {"cluster.workers": 2, "cluster.inject_failure": "worker=1,step=5"}
    result = shardprop.train(SETTINGS, data=rows, output=tmp_path / "lost", **flags)
    assert result.history["worker_restarts"] == [1]
    assert np.array_equal(result.theta, reference.theta)


def test_a_config_file_a_config_object_and_overrides(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train: {steps: 3, checkpoint_every: 0}\ntracking: {enabled: false}\n")
    run = shardprop.train(path, output=tmp_path / "a", **{"cluster.workers": 0})
    assert len(run.history["loss"]) == 3
    config = load_config(path)
    run = shardprop.train(config, output=tmp_path / "b", train={"steps": 4}, cluster={"workers": 0})
    assert len(run.history["loss"]) == 4
    # rows given in memory take the place of the config's own data.path
    settings = SETTINGS | {"data": SETTINGS["data"] | {"path": str(tmp_path / "nowhere.csv")}}
    run = shardprop.train(settings, data=frame(), output=tmp_path / "c", cluster={"workers": 0})
    assert run.final["rows"] + run.setup.val_rows == 301


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: shardprop.train(steps=3), r"steps: not a config key"),
        (lambda: shardprop.train(**{"train.stepz": 3}), r"train.stepz: unknown key"),
    ],
)
def test_bad_input_raises_the_one_line_the_command_prints(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
