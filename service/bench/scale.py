"""`shardprop bench scale`: training as the data grows. The step's time against the rows
(1 M to 10 M rows of 64 float32 features in Parquet) and the Ray workers (1, 2, 4 actors),
each worker's peak resident size against the plan's, and planning time against the number
of Parquet files (100 to 10,000).

Each (rows, workers) case runs in a fresh process with a local Ray runtime of its own, its
workers fresh actors that report their own process's peak. A step is what the coordinator
times per step before the optimizer (call, gather, reduce), on a small network: the rows,
not the weights, make the cost, as in a data-heavy job.
"""

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shardprop.service.bench.data import (
    MeasuredWorker,
    in_fresh_process,
    run_settings,
    start_local_ray,
    stop_local_ray,
    write_dataset,
)
from shardprop.service.bench.timing import Timing
from shardprop.service.bench.workload import prepare, step
from shardprop.service.cluster.capacity import estimate_run
from shardprop.service.config import Config, config_from
from shardprop.service.data.plan import plan_data
from shardprop.service.training.run import make_plan

ROWS = (1_000_000, 2_000_000, 5_000_000, 10_000_000)
WORKERS = (1, 2, 4)
FILE_COUNTS = (100, 1_000, 10_000)
FEATURES = 64
DTYPE = "float32"  # the features as stored and as trained
CLASSES = 3  # the bench's blobs
FILE_ROWS = 500_000  # rows per Parquet file of the step datasets
PLANNING_ROWS = 1_000_000  # the planning datasets: these rows, cut into more and more files
PLANNING_FEATURES = 8
REPEATS = 9  # steps timed per case; the median's noise falls as they grow


def bench_scale(
    rows: Sequence[int] = ROWS,
    workers: Sequence[int] = WORKERS,
    files: Sequence[int] = FILE_COUNTS,
    folder: str | Path | None = None,
    repeats: int = REPEATS,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Every (rows, workers) case's step and memory, then planning time per file count.
    `folder`: keep the datasets there between runs (default: a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="shardprop-bench-scale-") as scratch:
        root = Path(folder) if folder is not None else Path(scratch)
        step_data = {}
        for count in rows:
            say(f"writing {count:,} rows x {FEATURES} {DTYPE} features")
            step_data[count] = write_dataset(
                root / f"blobs-{count}x{FEATURES}-{DTYPE}",
                count,
                math.ceil(count / FILE_ROWS),
                FEATURES,
                DTYPE,
            )
        planning_data = {}
        for count in files:
            say(f"writing {PLANNING_ROWS:,} rows as {count:,} files")
            planning_data[count] = write_dataset(
                root / f"planning-{PLANNING_ROWS}x{PLANNING_FEATURES}-{count}files",
                PLANNING_ROWS,
                count,
                PLANNING_FEATURES,
            )
        os.sync()  # the kernel's writing back of the files is not the steps' time
        steps = []
        for count, data in step_data.items():
            for k in workers:
                say(f"{count:,} rows on {k} worker(s)")
                steps.append(in_fresh_process(measure_steps, str(data), k, repeats))
        planning = [
            measure_planning_time(data, count, repeats) for count, data in planning_data.items()
        ]
    return {
        "features": FEATURES,
        "dtype": DTYPE,
        "steps": steps,
        "per_row_spread": per_row_spread(steps),
        "planning": planning,
    }


def scale_config(data: str, workers: int) -> Config:
    """A run of the bench's network on `data` in float32, one CPU per worker."""
    settings = run_settings(data, workers)
    settings["model"]["dtype"] = DTYPE
    settings["cluster"]["cpus_per_worker"] = 1
    return config_from(settings)


def measure_steps(data: str, workers: int, repeats: int) -> dict[str, Any]:
    """Set-up (load, prepare, the transport) and the step of `workers` fresh actors on
    `data`, then each worker's peak resident size beside the plan's for it."""
    config = scale_config(data, workers)
    plan = make_plan(config)
    planned = estimate_run(config, plan, CLASSES).peaks
    ray = start_local_ray(workers)
    try:
        started = time.perf_counter()
        prepared = prepare(config, 0, worker_class=MeasuredWorker)
        set_up = time.perf_counter() - started
        try:
            timing = Timing.alternating([step(prepared)], repeats)[0]
            peaks = prepared.group.call("peak_rss")
        finally:
            prepared.group.close()
    finally:
        stop_local_ray(ray)
    rows = plan.total_rows
    return {
        "rows": rows,
        "workers": workers,
        "set_up_seconds": set_up,
        "step_seconds": timing.median,
        "step_seconds_low": timing.low,
        "step_seconds_high": timing.high,
        "step_ns_per_row": timing.median / rows * 1e9,
        "peak_rss_bytes": peaks,
        "planned_peak_bytes": planned,
        "measured_over_plan": [peak / plan for peak, plan in zip(peaks, planned, strict=True)],
    }


def measure_planning_time(data: Path, files: int, repeats: int) -> dict[str, Any]:
    """The coordinator's planning of `data` (footers only), the median of `repeats`."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan_data(str(data), None, "y", None, workers=2)
        seconds.append(time.perf_counter() - start)
    timing = Timing.over(seconds)
    return {
        "files": files,
        "rows": PLANNING_ROWS,
        "plan_seconds": timing.median,
        "plan_seconds_low": timing.low,
        "plan_seconds_high": timing.high,
        "plan_ms_per_file": timing.median / files * 1e3,
    }


def per_row_spread(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Per worker count: the step's largest time per row over its smallest, across the row
    counts (1.0: the step's cost grows with the rows and nothing else)."""
    spread = {}
    for k in sorted({case["workers"] for case in steps}):
        per_row = [case["step_ns_per_row"] for case in steps if case["workers"] == k]
        spread[f"workers{k}"] = max(per_row) / min(per_row)
    return spread


def render(result: dict[str, Any]) -> list[str]:
    mib = 2**20
    lines = [
        f"{'rows':>12} {'workers':>7} {'set-up s':>9} {'step s':>22} {'ns/row':>7} "
        f"{'peak MiB/worker':>16} {'plan MiB':>9} {'measured/plan':>14}"
    ]
    for case in result["steps"]:
        step_range = (
            f"{case['step_seconds']:.3f} [{case['step_seconds_low']:.3f}-"
            f"{case['step_seconds_high']:.3f}]"
        )
        lines.append(
            f"{case['rows']:>12,} {case['workers']:>7} {case['set_up_seconds']:>9.1f} "
            f"{step_range:>22} {case['step_ns_per_row']:>7.1f} "
            f"{max(case['peak_rss_bytes']) / mib:>16,.0f} "
            f"{max(case['planned_peak_bytes']) / mib:>9,.0f} "
            f"{max(case['measured_over_plan']):>14.3f}"
        )
    spread = ", ".join(f"{k} {v:.3f}" for k, v in result["per_row_spread"].items())
    lines.append(f"step time per row, largest over smallest: {spread}")
    lines.append(f"{'files':>12} {'plan s':>22} {'ms/file':>8}")
    for case in result["planning"]:
        plan_range = (
            f"{case['plan_seconds']:.3f} [{case['plan_seconds_low']:.3f}-"
            f"{case['plan_seconds_high']:.3f}]"
        )
        lines.append(f"{case['files']:>12,} {plan_range:>22} {case['plan_ms_per_file']:>8.3f}")
    return lines
