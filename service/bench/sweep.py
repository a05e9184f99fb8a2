"""`shardprop bench sweep`: a sweep of N trials against the same N `shardprop train` commands
one after another, and what Ray Tune and the sweep add to each trial.

Both sides run as a user runs them, as commands, each on a local Ray runtime of its own and
a sqlite store of its own. A trial's overhead is its time in Ray Tune less its MLflow run's
own time (start to end): Tune's placement of the trial and start of its process, and the
sweep's records.
"""

import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shardprop.service.errors import ConfigError

RATES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5)  # one a trial


def shardprop(*args: object, cwd: Path) -> float:
    """Seconds the command took; it must succeed."""
    started = time.monotonic()
    command = [sys.executable, "-m", "shardprop.service", *map(str, args), "--quiet"]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    return time.monotonic() - started


def bench_sweep(
    config: Path, trials: int, concurrent: int, folder: Path, sets: list[str]
) -> dict[str, Any]:
    from mlflow import MlflowClient

    if not 1 <= trials <= len(RATES):
        raise ConfigError(f"--trials {trials}: 1 to {len(RATES)}")
    rates = RATES[:trials]
    config = config.resolve()
    flags = [flag for item in sets for flag in ("--set", item)]
    one_by_one = folder / "one_by_one"
    one_by_one.mkdir(parents=True, exist_ok=True)
    sequential = 0.0
    for rate in rates:
        sequential += shardprop(
            "train", config, *flags, "--set", f"train.learning_rate={rate}",
            "--tracking-uri", f"sqlite:///{one_by_one / 'mlflow.db'}", cwd=one_by_one,
        )  # fmt: skip
    swept = folder / "sweep"
    swept.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{swept / 'mlflow.db'}"
    sweep_seconds = shardprop(
        "sweep", config, *flags, "--param", "train.learning_rate=" + ",".join(map(str, rates)),
        "--max-concurrent", concurrent, "--tracking-uri", uri, cwd=swept,
    )  # fmt: skip
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shardprop").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    table = client.download_artifacts(parent.info.run_id, "sweep/results.csv", str(swept))
    with open(table) as rows:
        seconds = {row["run_id"]: float(row["seconds"]) for row in csv.DictReader(rows)}
    overheads, spans = [], []
    for run in runs:
        if run.info.run_id in seconds:
            own = (run.info.end_time - run.info.start_time) / 1000
            overheads.append((seconds[run.info.run_id] - own, own))
            spans.append((run.info.start_time / 1000, run.info.end_time / 1000))
    return {
        "trials": trials,
        "max_concurrent": concurrent,
        "one_by_one_seconds": sequential,
        "sweep_seconds": sweep_seconds,
        "sweep_over_one_by_one": sweep_seconds / sequential,
        "overhead_seconds_median": statistics.median(o for o, _ in overheads),
        "run_seconds_median": statistics.median(r for _, r in overheads),
        "overhead_share_median": statistics.median(o / r for o, r in overheads),
        # the command's time while no trial's run was open: start-up, Tune, the end
        "outside_trials_seconds": sweep_seconds - covered(spans),
    }


def covered(spans: list[tuple[float, float]]) -> float:
    """Seconds inside at least one of the (start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def render(result: dict[str, Any]) -> list[str]:
    return [
        f"{result['trials']} trials, --max-concurrent {result['max_concurrent']}",
        f"one `shardprop train` after another: {result['one_by_one_seconds']:.1f} s",
        f"`shardprop sweep`: {result['sweep_seconds']:.1f} s "
        f"({result['sweep_over_one_by_one']:.3f} of one after another)",
        f"a trial's overhead (time in Tune less its run's own): median "
        f"{result['overhead_seconds_median']:.2f} s, "
        f"{result['overhead_share_median']:.3f} of its run's {result['run_seconds_median']:.1f} s",
        f"the sweep's time outside its trials' runs: {result['outside_trials_seconds']:.1f} s",
    ]
