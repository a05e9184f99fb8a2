"""Benchmark of the data path at scale: planning on the coordinator, one worker's read.

    shardprop bench data [--rows N] [--files F] [--folder DIR]

Memory is measured in fresh processes (multiprocessing "spawn"): a process's peak resident
size only grows, so a process that already wrote the dataset could not show what planning
or a read adds. Planning must stay flat (footers, not rows); a worker's read is compared with
the float64 (n0, m) array it ends with. Linux figures: current RSS comes from /proc.
"""

import concurrent.futures
import multiprocessing
import pickle
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardprop.service.bench.timing import Timing
from shardprop.service.data.plan import plan_data, write_table
from shardprop.workers.data.synthetic import SyntheticSpec, generate

ROW_GROUP_ROWS = 131_072
PLAN_WORKERS = 2
PLAN_REPEATS = 5
READ_REPEATS = 3
DONE = "_SUCCESS"  # written last; open_source skips "_" files, as it skips Spark's


def bench_planning(
    rows: int = 10_000_000, files: int = 100, features: int = 8, folder: str | Path | None = None
) -> dict:
    """Write (or reuse) a `rows` x `features` Parquet dataset of `files` files and measure
    planning time and memory on the coordinator, and one worker's read of its shard."""
    with tempfile.TemporaryDirectory(prefix="shardprop-bench-data-") as scratch:
        root = Path(folder) if folder is not None else Path(scratch)
        data = write_dataset(root / f"blobs-{rows}x{features}-{files}files", rows, files, features)
        plan_seconds = []
        for _ in range(PLAN_REPEATS):
            start = time.perf_counter()
            plan = plan_data(str(data), None, "y", None, workers=PLAN_WORKERS)
            plan_seconds.append(time.perf_counter() - start)
        planning = _in_fresh_process(measure_planning, str(data))
        reading = _in_fresh_process(measure_read, str(data))
        dataset_bytes = sum(file.stat().st_size for file in data.glob("*.parquet"))
    timing = Timing.over(plan_seconds)
    shard_rows = plan.shards[0][1] - plan.shards[0][0]
    return {
        "rows": rows,
        "files": files,
        "features": features,
        "row_group_rows": ROW_GROUP_ROWS,
        "dataset_bytes": dataset_bytes,
        "plan_seconds": timing.median,
        "plan_seconds_low": timing.low,
        "plan_seconds_high": timing.high,
        **planning,
        "shard_rows": shard_rows,
        **reading,
    }


def write_dataset(folder: Path, rows: int, files: int, features: int) -> Path:
    """The blobs dataset as `files` Parquet files of near-equal size; kept once complete."""
    if (folder / DONE).exists():
        return folder
    spec = SyntheticSpec("blobs", rows, features=features, seed=0)
    base, extra = divmod(rows, files)
    start = 0
    for i in range(files):
        stop = start + base + (i < extra)
        write_table(generate(spec, start, stop), folder / f"part-{i:05d}.parquet", ROW_GROUP_ROWS)
        start = stop
    (folder / DONE).write_text("")
    return folder


def measure_planning(data: str) -> dict:
    """What planning adds to a fresh coordinator: Python heap, Arrow memory, peak RSS."""
    baseline = _current_rss()
    arrow_before = pa.default_memory_pool().max_memory()
    tracemalloc.start()
    plan = plan_data(data, None, "y", None, workers=PLAN_WORKERS)
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "plan_python_peak_bytes": python_peak,
        "plan_arrow_peak_bytes": pa.default_memory_pool().max_memory() - arrow_before,
        "plan_rss_growth_bytes": max(_peak_rss() - baseline, 0),
        "plan_pickled_bytes": len(pickle.dumps(plan)),  # what every worker is sent
    }


def measure_read(data: str) -> dict:
    """Rank 0 of a 2-worker plan: Source.read, then the float64 (n0, m) array, as a shard does."""
    plan = plan_data(data, None, "y", None, workers=PLAN_WORKERS)
    start, stop = plan.shards[0]
    baseline = _current_rss()
    seconds = []
    for repeat in range(READ_REPEATS):
        began = time.perf_counter()
        X = _load(plan.source, plan.features, plan.label, start, stop)
        seconds.append(time.perf_counter() - began)
        if repeat == 0:  # later reads reuse memory the first one grew: only it says the peak
            read_peak = _peak_rss() - baseline
            arrow_peak = pa.default_memory_pool().max_memory()
        del X
    timing = Timing.over(seconds)
    array_bytes = len(plan.features) * (stop - start) * 8
    return {
        "read_seconds": timing.median,
        "read_rows_per_second": (stop - start) / timing.median,
        "read_array_bytes": array_bytes,
        "read_rss_growth_bytes": read_peak,
        "read_peak_over_array": read_peak / array_bytes,
        "read_arrow_peak_bytes": arrow_peak,
    }


def _load(source, features: tuple[str, ...], label: str, start: int, stop: int) -> np.ndarray:
    table = source.read([*features, label], start, stop)
    X = np.empty((len(features), table.num_rows), dtype=np.float64)  # (n0, m)
    for i, name in enumerate(features):
        X[i] = pc.cast(table.column(name), pa.float64()).to_numpy()
    return X


def _in_fresh_process(measure, data: str) -> dict:
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(measure, data).result()


def _current_rss() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:  # not Linux: the peak so far is the best baseline there is
        return _peak_rss()
    return pages * resource.getpagesize()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
