"""A null label, or a NaN or inf feature, is refused naming the row where a user finds it: its
row in the table, and the file it is in with its row there. Real Parquet and CSV files."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from shardprop.service.data.plan import plan_data
from shardprop.workers.shard import ShardWorker

FILE_ROWS = 40
# global rows: a null label at 53 and 60 (rows 13 and 20 of part-1), an inf x0 at 85 (part-2's 5)
NULL_LABELS = {1: (13, 20)}
INF_FEATURES = {2: (5,)}


def write_parts(folder: Path, fmt: str) -> Path:
    """Three files of FILE_ROWS rows: x0, x1 and an integer label y with the bad values above."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for part in range(3):
        x0 = rng.standard_normal(FILE_ROWS)
        x0[list(INF_FEATURES.get(part, ()))] = np.inf
        y = rng.integers(0, 2, FILE_ROWS).tolist()
        for row in NULL_LABELS.get(part, ()):
            y[row] = None
        table = pa.table(
            {"x0": x0, "x1": rng.standard_normal(FILE_ROWS), "y": pa.array(y, pa.int64())}
        )
        path = folder / f"part-{part}.{fmt}"
        if fmt == "csv":
            pacsv.write_csv(table, path)  # a null label is an empty field
        else:
            pq.write_table(table, path)
    return folder


def shard_stats(path: Path, workers: int) -> tuple[list, tuple[str, ...]]:
    plan = plan_data(str(path), None, "y", None, workers)
    stats = [
        ShardWorker(rank, plan.source, plan.columns, plan.label, start, stop).load()
        for rank, (start, stop) in enumerate(plan.shards)
    ]
    return stats, plan.source.files


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_each_shard_names_the_table_row_and_the_file_row_of_its_first_bad_value(tmp_path, fmt):
    stats, files = shard_stats(write_parts(tmp_path / "parts", fmt), workers=2)  # rows 0-59, 60-
    assert files[1].endswith(f"part-1.{fmt}") and files[2].endswith(f"part-2.{fmt}")
    assert [part.label_nulls for part in stats] == [1, 1]
    assert stats[0].first_bad == {"y": f"row 53: row 13 of {files[1]}"}
    assert stats[1].first_bad == {"y": f"row 60: row 20 of {files[1]}"}  # its first, as global
    assert stats[1].first_infinite == {"x0": f"row 85: row 5 of {files[2]}"}


def test_one_file_is_named_once(tmp_path):
    table = pa.table({"x0": [0.5, 1.0, 2.0, 3.0], "y": pa.array([1.0, 0.0, np.nan, None])})
    pq.write_table(table, tmp_path / "one.parquet")
    [stats], [file] = shard_stats(tmp_path / "one.parquet", workers=1)
    assert stats.label_nulls == 2  # NaN and null alike
    assert stats.first_bad == {"y": f"row 2 of {file}"}


def test_clean_rows_name_nothing(tmp_path):
    table = pa.table({"x0": [0.5, 1.0, 2.0], "y": ["a", "b", "a"]})
    pq.write_table(table, tmp_path / "clean.parquet")
    [stats], _ = shard_stats(tmp_path / "clean.parquet", workers=1)
    assert (stats.label_nulls, stats.first_bad) == (0, {})


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_the_command_names_the_first_null_label_in_one_line_and_exits_2(tmp_path, fmt):
    folder = write_parts(tmp_path / "parts", fmt)
    config = tmp_path / "config.yaml"
    config.write_text(f"data: {{path: {folder}, label: y, features: [x1]}}\n")
    command = [str(Path(sys.executable).parent / "shardprop"), "train", str(config)]
    command += ["--workers", "0", "--no-tracking", "--output", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert "label column 'y' has 2 null" in done.stderr
    assert f"row 53: row 13 of {folder / f'part-1.{fmt}'}" in done.stderr
