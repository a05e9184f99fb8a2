"""`shardprop bench startup`: from typing `shardprop train CONFIG` to its first finished step
(Python, imports, Ray's start-up, MLflow, the workers reading their rows: all of it), against
Ray Train's TorchTrainer from fit() to its first step, on the same rows from the same weights.
"""

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from shardprop.service.bench import raytrain
from shardprop.service.bench.timing import Timing
from shardprop.service.bench.workload import Workload, prepare, same_start
from shardprop.service.cluster.runtime import connect_ray
from shardprop.service.errors import TrainingError

# what the command prints when stderr is not a terminal, each line just after what it marks
MILESTONES = {"training starts": "training on ", "first step done": "step 1/"}
# these would make the command draw a progress bar instead of printing lines
TERMINAL_VARIABLES = {"FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"}


def time_command(config: Path, tracking: bool = True) -> dict[str, float]:
    """Seconds from starting `shardprop train CONFIG` in a new process until it says training
    starts, until its first step is done, and until it exits; run in CONFIG's folder (where
    its sqlite MLflow store and outputs go). Read from its plain progress lines: nothing in
    the trainer is there for the bench."""
    command = [str(Path(sys.executable).parent / "shardprop"), "train", str(config)]
    if not tracking:
        command.append("--no-tracking")
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_VARIABLES}
    seen: dict[str, float] = {}
    lines: list[str] = []
    started = time.perf_counter()
    with subprocess.Popen(
        command,
        cwd=config.parent,
        env=env | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            for moment, prefix in MILESTONES.items():
                if moment not in seen and line.startswith(prefix):
                    seen[moment] = time.perf_counter() - started
    seen["exit"] = time.perf_counter() - started
    if process.returncode or len(seen) <= len(MILESTONES):
        tail = " | ".join(line.strip() for line in lines[-3:])
        raise TrainingError(
            f"`{' '.join(command)}` exited with {process.returncode} "
            f"before its first step was seen: {tail}"
        )
    return seen


def bench_startup(
    workload: Workload, steps: int = 3, repeats: int = 1, tracking: bool = True
) -> dict[str, Any]:
    """The command on 2 workers, then Ray Train's fit() on 2 × 1 CPU (where it is installed),
    `steps` steps each, `repeats` times each; Ray's start-up in this process is timed once."""
    with tempfile.TemporaryDirectory(prefix="shardprop-startup-") as folder:
        config = Path(folder) / "workload.yaml"
        config.write_text(yaml.safe_dump(workload.settings(2, steps), sort_keys=False))
        runs = [time_command(config, tracking) for _ in range(repeats)]
    seconds = {
        f"shardprop train: command to {moment}": Timing.over([run[moment] for run in runs])
        for moment in (*MILESTONES, "exit")
    }
    result: dict[str, Any] = {
        "workload": asdict(workload),
        "steps": steps,
        "tracking": tracking,
        "command": workload.settings(2, steps),
    }
    if raytrain.available():
        seconds |= time_ray_train(workload, steps, repeats)
    result["seconds"] = {name: asdict(t) for name, t in seconds.items()}
    result["ratios"] = startup_ratios({name: t.median for name, t in seconds.items()})
    return result


def time_ray_train(workload: Workload, steps: int, repeats: int) -> dict[str, Timing]:
    """Ray Train's moments after fit(), from the rows and weights of our in-process run."""
    local = prepare(workload.config(0), workload.seed)
    start = same_start(local)
    local.group.close()
    began = time.perf_counter()
    started_ray = connect_ray(None, 2)  # a local runtime, as Ray Train's users start it
    ray_start = time.perf_counter() - began
    try:
        runs = [raytrain.fit_ray_train(start, steps) for _ in range(repeats)]
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    seconds = {
        "Ray Train: fit() to training function": [r.to_train_function for r in runs],
        "Ray Train: fit() to first step (ready)": [r.to_first_step for r in runs],
        "Ray Train: fit() to first step done": [r.to_first_step_done for r in runs],
        "Ray Train: fit() to return": [r.to_return for r in runs],
    }
    if started_ray:  # Ray was not running already: its start-up is a figure of this run
        seconds["Ray Train: ray.init()"] = [ray_start]
    return {name: Timing.over(values) for name, values in seconds.items()}


def startup_ratios(median: dict[str, float]) -> dict[str, float]:
    """Our first finished step against Ray Train being ready to start its first (target:
    ≤ 0.5), without and with Ray's start-up on Ray Train's side."""
    ours = median["shardprop train: command to first step done"]
    ready = median.get("Ray Train: fit() to first step (ready)")
    if ready is None:
        return {}
    out = {"command to first step done / Ray Train fit() to ready": ours / ready}
    if "Ray Train: ray.init()" in median:
        out["command to first step done / Ray Train ray.init() + fit() to ready"] = ours / (
            median["Ray Train: ray.init()"] + ready
        )
    return out


def render(result: dict[str, Any]) -> list[str]:
    w = result["workload"]
    lines = [
        f"workload: {w['rows']:,} rows x {w['features']} -> {list(w['hidden'])} -> 1, "
        f"{w['dtype']}, 2 workers x 1 CPU, {result['steps']} steps, "
        f"MLflow tracking {'on' if result['tracking'] else 'off'}",
        f"{'':48} {'median':>9} {'min':>9} {'max':>9}",
    ]
    for name, t in result["seconds"].items():
        lines.append(f"{name:48} {t['median']:7.2f} s {t['low']:7.2f} s {t['high']:7.2f} s")
    lines += [f"{name:70} {value:6.3f}" for name, value in result["ratios"].items()]
    return lines
