"""A worker's memory while it loads its rows: the batches it keeps and little more. Each
measure runs in a fresh process, whose peak resident size is the load's alone."""

from pathlib import Path

import pyarrow as pa
import pytest

from shardprop.service.bench.data import measure_load
from shardprop.service.data.plan import write_table
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from tests.processes import in_fresh_process

ROWS, FEATURES = 400_000, 64  # 100 MB of float32 rows, 200 MB of float64
LEAN = 1.2  # the peak while loading, over the batches kept
CONSTANT = 48 * 2**20  # and a piece being read, Arrow's and numpy's own allocations


def blobs(folder: Path, dtype: str) -> str:
    """The blobs rows as 4 Parquet files, the features stored in `dtype`."""
    table = generate(SyntheticSpec("blobs", ROWS, features=FEATURES, classes=3), 0, ROWS)
    if dtype == "float32":
        table = table.cast(
            pa.schema(
                [(name, pa.int64() if name == "y" else pa.float32()) for name in table.column_names]
            )
        )
    for part in range(4):
        rows = table.slice(part * ROWS // 4, ROWS // 4)
        write_table(rows, folder / f"part-{part}.parquet", 50_000)
    return str(folder)


@pytest.mark.parametrize(
    "stored, dtype, validation",
    [("float32", "float32", 0.0), ("float64", "float64", 0.0), ("float64", "float64", 0.2)],
)
def test_loading_peaks_within_a_fifth_of_the_batches(tmp_path, stored, dtype, validation):
    """float32 rows go straight into float32 batches, never through a float64 copy of the
    shard; the validation rows into their own batch."""
    figures = in_fresh_process(measure_load, blobs(tmp_path, stored), dtype, validation)
    assert figures["loading_peak_bytes"] <= LEAN * figures["loading_final_bytes"] + CONSTANT, (
        figures
    )
