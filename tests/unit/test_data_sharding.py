"""Shards of a multi-file Parquet dataset: together they are the dataset, each reads only its own.

Row groups are deliberately uneven (inside a file and between files), so that shard edges
fall inside groups, on group edges and on file edges. Decoded row groups are counted for real
by recording every ParquetFile.read_row_group call; the row groups a shard needs are worked
out independently, from the footers.
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardprop.service.bench.data import bench_planning
from shardprop.service.data.plan import plan_data
from tests.processes import in_fresh_process
from tests.unit.test_data import make_table

# rows of each row group, per file: uneven within files and between them (1376 rows)
GROUPS = ((100, 37, 250), (5,), (300, 1, 64, 128), (90, 90, 17), (294,))
COLUMNS = ["x0", "x1", "flag", "y"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, pa.Table]:
    """Files part-0.. with exactly GROUPS row groups; the folder and the whole table."""
    folder = tmp_path_factory.mktemp("uneven")
    whole = make_table(sum(map(sum, GROUPS)))
    start = 0
    for i, groups in enumerate(GROUPS):
        with pq.ParquetWriter(folder / f"part-{i}.parquet", whole.schema) as writer:
            for rows in groups:
                writer.write_table(whole.slice(start, rows), row_group_size=rows)
                start += rows
    return str(folder), whole


def needed_groups(folder: str, start: int, stop: int) -> set[tuple[str, int]]:
    """(file, row group) whose global rows overlap [start, stop), from the footers alone."""
    needed = set()
    offset = 0
    for i in range(len(GROUPS)):
        path = f"{folder}/part-{i}.parquet"
        metadata = pq.ParquetFile(path).metadata
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if offset < stop and offset + rows > start:
                needed.add((path, group))
            offset += rows
    return needed


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[str, int, tuple[str, ...]]]:
    """Every (file, row group, columns) a ParquetFile decodes while the test runs."""
    calls: list[tuple[str, int, tuple[str, ...]]] = []
    opened = pq.ParquetFile.__init__
    read_row_group = pq.ParquetFile.read_row_group

    def record_path(self, source, *args, **kwargs):
        self._counted_path = str(source)
        opened(self, source, *args, **kwargs)

    def record_group(self, group, columns=None, *args, **kwargs):
        calls.append((self._counted_path, group, tuple(columns)))
        return read_row_group(self, group, columns, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", record_path)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", record_group)
    return calls


def test_the_footers_hold_the_uneven_row_groups(dataset):
    folder, _ = dataset
    for i, groups in enumerate(GROUPS):
        metadata = pq.ParquetFile(f"{folder}/part-{i}.parquet").metadata
        assert tuple(metadata.row_group(g).num_rows for g in range(len(groups))) == groups


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_shards_in_rank_order_are_the_dataset_in_order(dataset, workers):
    folder, whole = dataset
    plan = plan_data(folder, None, "y", None, workers)
    shards = [plan.source.read(COLUMNS, start, stop) for start, stop in plan.shards]
    assert [shard.num_rows for shard in shards] == [stop - start for start, stop in plan.shards]
    assert pa.concat_tables(shards).equals(whole.select(COLUMNS))


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_no_worker_decodes_a_row_group_outside_its_shard(dataset, decoded, workers):
    folder, _ = dataset
    plan = plan_data(folder, None, "y", None, workers)
    assert not decoded, "planning reads footers, never row groups"
    for start, stop in plan.shards:
        decoded.clear()
        plan.source.read(COLUMNS, start, stop)
        assert len(decoded) == len(set(decoded)), f"a column chunk decoded twice: {decoded}"
        groups = {(path, group) for path, group, _ in decoded}
        assert groups == needed_groups(folder, start, stop), (start, stop)
        for group in groups:  # every column of it, one at a time
            columns = [c for path, g, (c,) in decoded if (path, g) == group]
            assert sorted(columns) == sorted(COLUMNS)


def test_a_shard_edge_inside_a_row_group_decodes_that_group_on_both_sides(dataset, decoded):
    folder, whole = dataset
    plan = plan_data(folder, None, "y", None, 2)  # 688 | 688: inside file 2's 300-row group
    assert plan.shards == ((0, 688), (688, 1376))
    both = needed_groups(folder, 0, 688) & needed_groups(folder, 688, 1376)
    assert both == {(f"{folder}/part-2.parquet", 0)}
    assert plan.source.read(["x0"], 688, 689).equals(whole.select(["x0"]).slice(688, 1))


def test_bench_planning_reports_figures_on_a_small_dataset(tmp_path):
    # a fresh interpreter: its own workers must not find a logged model's copy of shardprop
    figures = in_fresh_process(bench_planning, 20_000, 4, 8, tmp_path)
    # rank 0 of a run's 2 workers: whole blocks of the exact reduction
    assert figures["rows"] == 20_000 and figures["shard_rows"] == 10_240
    low, median, high = (figures[f"plan_seconds{end}"] for end in ("_low", "", "_high"))
    assert 0 < low <= median <= high
    assert figures["read_rows_per_second"] > 0
    # rank 0's batches: 8 features, the row of ones and the 3 classes' targets, in float64
    assert figures["loading_final_bytes"] == (8 + 1 + 3) * 10_240 * 8
    assert 0 < figures["plan_pickled_bytes"] < 10_000  # footers' summary, not rows
    again = in_fresh_process(bench_planning, 20_000, 4, 8, tmp_path)  # the dataset is reused
    assert again["dataset_bytes"] == figures["dataset_bytes"]
    assert len(list(tmp_path.iterdir())) == 1
