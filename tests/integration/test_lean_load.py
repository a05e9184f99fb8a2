"""A worker's memory while it loads its rows: the batches it keeps and little more. Each
measure runs in a fresh process, whose peak resident size is the load's alone."""

import pytest

from shardprop.service.bench.data import measure_load, write_dataset
from tests.processes import in_fresh_process

ROWS, FEATURES = 400_000, 64  # 100 MB of float32 rows, 200 MB of float64
LEAN = 1.2  # the peak while loading, over the batches kept
CONSTANT = 48 * 2**20  # and a piece being read, Arrow's and numpy's own allocations


@pytest.mark.parametrize(
    "stored, dtype, validation",
    [("float32", "float32", 0.0), ("float64", "float64", 0.0), ("float64", "float64", 0.2)],
)
def test_loading_peaks_within_a_fifth_of_the_batches(tmp_path, stored, dtype, validation):
    """float32 rows go straight into float32 batches, never through a float64 copy of the
    shard; the validation rows into their own batch."""
    data = str(write_dataset(tmp_path / "blobs", ROWS, 4, FEATURES, stored))
    figures = in_fresh_process(measure_load, data, dtype, validation)
    assert figures["loading_peak_bytes"] <= LEAN * figures["loading_final_bytes"] + CONSTANT, (
        figures
    )
