"""Benchmark of the data path at scale: planning on the coordinator, one worker's read, and
each worker's peak memory beside the plan's.

    shardprop bench data [--rows N] [--files F] [--folder DIR]

Memory is measured in fresh processes (in_fresh_process): a process's peak resident
size only grows, so a process that already wrote the dataset could not show what planning
or a read adds. Planning must stay flat (footers, not rows); a worker's read is compared with
the float64 (n0, m) array it ends with; a run's workers (real Ray actors, or the in-process
run) with the peak the plan gives them. Linux figures: current RSS comes from /proc.
"""

import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from contextlib import closing, suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

from shardprop.service.bench.timing import Timing
from shardprop.service.data.plan import plan_data, write_table
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from shardprop.workers.network.params import init_params
from shardprop.workers.shard import ShardWorker

ROW_GROUP_ROWS = 131_072
PLAN_WORKERS = 2
PLAN_REPEATS = 5
READ_REPEATS = 3
DONE = "_SUCCESS"  # written last; open_source skips "_" files, as it skips Spark's
RUN_HIDDEN = [32]  # a small network: the rows make the memory, as in a data-heavy job
RUN_STEPS = 3
BASELINE_ROWS = 2_000  # a job small enough that its process is all there is to measure
BASELINE_FEATURES = 64
RUNTIME_EXIT_SECONDS = 30
FRESH_PROCESS_SECONDS = 1800  # a measure's bound: 10 M rows on one worker take about a minute


def bench_planning(
    rows: int = 10_000_000,
    files: int = 100,
    features: int = 8,
    folder: str | Path | None = None,
    workers: Sequence[int] = (),
) -> dict:
    """Write (or reuse) a `rows` x `features` Parquet dataset of `files` files and measure
    planning time and memory on the coordinator, and one worker's read of its shard; then, for
    each count in `workers`, a short run's peak memory per worker beside the plan's (0: the
    in-process run; more: real Ray actors on a local runtime)."""
    with tempfile.TemporaryDirectory(prefix="shardprop-bench-data-") as scratch:
        root = Path(folder) if folder is not None else Path(scratch)
        data = write_dataset(root / f"blobs-{rows}x{features}-{files}files", rows, files, features)
        plan_seconds = []
        for _ in range(PLAN_REPEATS):
            start = time.perf_counter()
            plan_data(str(data), None, "y", None, workers=PLAN_WORKERS)
            plan_seconds.append(time.perf_counter() - start)
        planning = in_fresh_process(measure_planning, str(data))
        loading = in_fresh_process(measure_load, str(data), "float64", 0.0, PLAN_WORKERS)
        runs: dict[str, Any] = {}
        for count in workers:
            runs |= in_fresh_process(measure_run, str(data), count, Path(scratch))
        dataset_bytes = sum(file.stat().st_size for file in data.glob("*.parquet"))
    timing = Timing.over(plan_seconds)
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
        **loading,
        **runs,
    }


def write_dataset(
    folder: Path, rows: int, files: int, features: int, dtype: str = "float64"
) -> Path:
    """The blobs dataset as `files` Parquet files of near-equal size, its features stored
    in `dtype`; kept once complete."""
    if (folder / DONE).exists():
        return folder
    spec = SyntheticSpec("blobs", rows, features=features, seed=0)
    base, extra = divmod(rows, files)
    start = 0
    for i in range(files):
        stop = start + base + (i < extra)
        table = generate(spec, start, stop)
        if dtype != "float64":  # the label stays as generated
            stored = pa.from_numpy_dtype(np.dtype(dtype))
            fields = [f if f.name == "y" else f.with_type(stored) for f in table.schema]
            table = table.cast(pa.schema(fields))
        write_table(table, folder / f"part-{i:05d}.parquet", ROW_GROUP_ROWS)
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


class MeasuredWorker(ShardWorker):
    """A shard worker that tells its process's peak resident size."""

    def peak_rss(self) -> int:
        return _peak_rss()


def run_settings(data: str, workers: int, tracking_uri: str | None = None) -> dict[str, Any]:
    """A short run on the bench's dataset (blobs: 3 classes), tracked where `tracking_uri`
    says, untracked without one."""
    return {
        "data": {"path": data, "label": "y", "task": "multiclass"},
        "model": {"hidden": RUN_HIDDEN},
        "train": {"steps": RUN_STEPS, "checkpoint_every": RUN_STEPS},
        "cluster": {"workers": workers},
        "tracking": {"enabled": tracking_uri is not None, "uri": tracking_uri},
    }


def measure_run(data: str, workers: int, scratch: Path, classes: int = 3) -> dict:
    """Each worker's peak resident size in a short run beside the plan's peak for it.

    In-process (workers = 0): the whole run (`train`, MLflow tracking included), whose one
    process holds everything. On Ray: the workers' load, prepare, steps and evaluation, as a
    run makes them, each worker reporting its own process's peak.
    """
    # a run's modules (MLflow, matplotlib) load in the processes that measure a run only
    from shardprop.service.cluster.capacity import estimate_run
    from shardprop.service.cluster.group import start_group
    from shardprop.service.config import config_from
    from shardprop.service.training.run import make_plan, set_up_workers, train

    tracked = f"sqlite:///{scratch / f'mlflow-{workers}.db'}"
    config = config_from(run_settings(data, workers, tracked if not workers else None))
    plan = make_plan(config)
    planned = estimate_run(config, plan, classes).peaks
    if not workers:
        train(config, output=scratch / "in-process")
        return _compared("in_process", [_peak_rss()], planned)
    ray = start_local_ray(workers)
    group = start_group(plan, config.cluster, MeasuredWorker)
    with closing(group):
        _, _, arch = set_up_workers(group, plan, config)
        theta = init_params(arch.layout, "he", 0, config.model.dtype)
        for _ in range(RUN_STEPS):
            group.call("gradient", theta)
        group.call("evaluate", theta)
        measured = group.call("peak_rss")
    stop_local_ray(ray)
    return _compared(f"workers{workers}", measured, planned)


def measure_load(
    data: str, dtype: str = "float64", validation_fraction: float = 0.0, workers: int = 1
) -> dict:
    """Rank 0 of a `workers`-worker plan of `data` (blobs: 3 classes) loads and prepares its
    rows as a run's worker does, in this process: how long its read takes, and its peak
    resident size above where it began against the batches it keeps."""
    from shardprop.service.config import config_from
    from shardprop.service.training.run import make_plan, set_up_workers

    settings = run_settings(data, workers)
    settings["model"]["dtype"] = dtype
    settings["data"]["validation_fraction"] = validation_fraction
    config = config_from(settings)
    plan = make_plan(config)
    start, stop = plan.shards[0]
    worker = ShardWorker(0, plan.source, plan.columns, plan.label, start, stop, grid=plan.grid)
    before = _current_rss()
    _reset_peak_rss()
    loaded, _, _ = set_up_workers(_OneWorker(worker), plan, config)
    loading = _peak_rss() - before
    batches = [batch for batch in (worker.batch, worker.val_batch) if batch is not None]
    final = sum(batch.X1.nbytes + batch.Y.nbytes for batch in batches)
    return {
        "shard_rows": stop - start,
        "read_seconds": loaded[0].read_seconds,
        "read_rows_per_second": (stop - start) / loaded[0].read_seconds,
        "loading_final_bytes": final,
        "loading_peak_bytes": loading,
        "loading_over_final": loading / final,
    }


class _OneWorker:
    """One worker in this process, as a group of one: set_up_workers's calls reach it."""

    size, restarts = 1, 0

    def __init__(self, worker: ShardWorker):
        self.worker = worker

    def call(self, method: str, *args: Any, while_waiting: Any = None) -> list[Any]:
        return [getattr(self.worker, method)(*args)]


def start_local_ray(workers: int) -> ModuleType:
    """A local Ray runtime as a run starts one (service/cluster/runtime.py), started here so
    that the process that measures also ends it."""
    import ray

    cpus = max(os.cpu_count() or 1, workers)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    return ray


def stop_local_ray(ray: ModuleType) -> None:
    """Shut the runtime started here down, and wait until its processes are gone (at most
    RUNTIME_EXIT_SECONDS): the next measure must not share the machine with their exit."""
    processes = _descendants(os.getpid())
    ray.shutdown()
    deadline = time.monotonic() + RUNTIME_EXIT_SECONDS
    while any(map(_running, processes)) and time.monotonic() < deadline:
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited, and waits only to be reaped


def _compared(prefix: str, measured: list[int], planned: list[int]) -> dict:
    figures = {}
    for rank, (peak, plan) in enumerate(zip(measured, planned, strict=True)):
        name = prefix if prefix == "in_process" else f"{prefix}_rank{rank}"
        figures |= {
            f"{name}_peak_rss_bytes": peak,
            f"{name}_planned_peak_bytes": plan,
            f"{name}_measured_over_plan": peak / plan,
        }
    return figures


def measure_process_baselines(folder: str | Path) -> dict:
    """What the processes of a run cost before its rows: the figures behind the plan's
    process constants (service/data/estimate.py, service/cluster/capacity.py), each from a
    fresh process running a 2,000-row job of 64 features."""
    data = write_dataset(Path(folder) / "baseline", BASELINE_ROWS, 1, BASELINE_FEATURES)
    scratch = Path(folder)
    workers = in_fresh_process(measure_run, str(data), 2, scratch)
    in_process = in_fresh_process(measure_run, str(data), 0, scratch)
    return {
        "worker_process_bytes": max(
            peak for key, peak in workers.items() if key.endswith("_peak_rss_bytes")
        ),
        "in_process_bytes": in_process["in_process_peak_rss_bytes"],
        "coordinator_process_bytes": in_fresh_process(measure_coordinator, str(data), scratch),
        "ray_processes_bytes": in_fresh_process(measure_ray_processes),
    }


def measure_coordinator(data: str, scratch: Path) -> int:
    """The peak resident size of the coordinator of a tracked 2-worker run."""
    from shardprop.service.config import config_from
    from shardprop.service.training.run import train

    tracked = f"sqlite:///{scratch / 'mlflow-coordinator.db'}"
    ray = start_local_ray(2)
    train(config_from(run_settings(data, 2, tracked)), output=scratch / "coordinator")
    ray.shutdown()
    return _peak_rss()


def measure_ray_processes(settle_seconds: float = 3.0) -> int:
    """The resident size of the processes a local Ray start adds, its workers left out."""
    ray = start_local_ray(2)
    try:
        time.sleep(settle_seconds)  # the agents start after ray.init returns
        # idle workers Ray starts ahead become the run's workers, counted as theirs
        daemons = [pid for pid in _descendants(os.getpid()) if not _is_idle_worker(pid)]
        return sum(_rss(pid) for pid in daemons)
    finally:
        ray.shutdown()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _is_idle_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::IDLE")
    except OSError:
        return False


def _rss(pid: int) -> int:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * resource.getpagesize()


def in_fresh_process(measure: Callable[..., Any], *args: Any) -> Any:
    """`measure(*args)` in a new interpreter, its result pickled back: a fresh process's peak
    memory is the measure's alone. Not a multiprocessing child: that inherits this process's
    sys.path, where an MLflow model loaded here may have put its own partial copy of
    shardprop first."""
    with tempfile.TemporaryDirectory(prefix="shardprop-measure-") as folder:
        call, result = Path(folder) / "call.pkl", Path(folder) / "result.pkl"
        call.write_bytes(pickle.dumps((measure, args)))
        script = (
            "import pickle, sys; measure, args = pickle.load(open(sys.argv[1], 'rb')); "
            "pickle.dump(measure(*args), open(sys.argv[2], 'wb'))"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(call), str(result)],
            capture_output=True,
            text=True,
            timeout=FRESH_PROCESS_SECONDS,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{measure.__name__} failed: {done.stderr[-3000:]}")
        return pickle.loads(result.read_bytes())


def _current_rss() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:  # not Linux: the peak so far is the best baseline there is
        return _peak_rss()
    return pages * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Start this process's peak resident size afresh from its current size, where Linux
    allows it (proc(5): writing 5 to clear_refs)."""
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    """This process's peak resident size: VmHWM on Linux, where ru_maxrss would carry the
    parent's peak across the fork and exec of a spawned process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
