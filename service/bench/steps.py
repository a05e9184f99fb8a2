"""`shardprop bench`: one full-batch step of the standard workload, in this process and on 1,
2 and 4 Ray workers, against the same step's matrix products alone and against Ray alone
(a step without the math); scikit-learn's full-batch epoch, PyTorch's eager step and Ray
Train's DDP step (TorchTrainer, 2 × 1 CPU, gloo) beside it when they are installed.

Every figure is a median over repeats (with min and max), and every comparison is a ratio
between figures taken in the same run: the machines are noisy, their ratios much less so.
"""

from contextlib import ExitStack
from dataclasses import asdict
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from shardprop.service.bench import raytrain
from shardprop.service.bench.peers import (
    SKLEARN_EPOCH,
    TORCH_STEP,
    SameStart,
    sklearn_epoch,
    torch_step,
)
from shardprop.service.bench.timing import (
    BLAS_SPIN_SECONDS,
    Timing,
    alternating_seconds,
    gemms_of_step,
)
from shardprop.service.bench.workload import (
    Prepared,
    Workload,
    our_losses,
    prepare,
    same_start,
    step,
)
from shardprop.service.cluster.runtime import connect_ray
from shardprop.service.config import Config

RAY_TRAIN_STEP = "Ray Train DDP step"
EXACT = ", exact reduction"  # train.reduction: exact, beside the same figure in rank order
# rounds at least for Ray workers in turns with the in-process step: their ratio is near 1,
# and a median over fewer rounds moves from run to run by more than the gap it measures
PAIRED_REPEATS = 41
# one thread driving all the BLAS threads: its products run on every core, its elementwise
# passes on one; the reference two single-CPU Ray workers are compared with
ONE_THREAD = "in-process step on one thread"
TRANSPORTS = {"compiled": "compiled graph", "plain": "plain actor calls"}
IDLE_SECONDS = 0.01  # an untimed pause before each run: what the last one left running stops
RAY_ALONE_REPEATS = 50  # at least: a step without the math is short, its median noisy


def timed(config: Config, repeats: int, method: str = "gradient") -> Timing:
    """The `method` step of fresh workers for `config`, which are closed after."""
    prepared = prepare(config, 0, method)
    try:
        return Timing.alternating([step(prepared, method)], repeats)[0]
    finally:
        prepared.group.close()


def beside_local(
    local: Prepared, config: Config, repeats: int, pause: float = IDLE_SECONDS
) -> tuple[list[float], list[float]]:
    """The seconds of the in-process step and of fresh workers' step for `config`, taken in
    turns round by round, so that the host's drift falls on both alike. A `local` whose one
    thread drives several BLAS threads needs `pause` = BLAS_SPIN_SECONDS, or their spinning
    after it falls on the workers."""
    prepared = prepare(config, 0)
    try:
        runs = [step(local), step(prepared)]
        return alternating_seconds(runs, max(repeats, PAIRED_REPEATS), pause)
    finally:
        prepared.group.close()


def bench_steps(
    workload: Workload,
    workers: tuple[int, ...],
    repeats: int,
    peers: bool = True,
) -> dict[str, Any]:
    """Every figure of the table, in seconds, plus the losses the peers reached."""
    timings: dict[str, Timing] = {}
    rounds: dict[str, dict[str, list[float]]] = {}  # k Ray workers' and the in-process step's
    losses: dict[str, float] = {}
    ray_train: dict[str, Any] = {}
    with threadpool_limits(limits=workload.threads), ExitStack() as cleanup:
        local = prepare(workload.config(0), workload.seed)
        cleanup.callback(local.group.close)
        bench_in_process(local, workload, repeats, timings)
        losses["shardprop"] = step(local)()
        if peers:
            start = same_start(local)
            bench_peers(start, workload.threads, repeats, timings, losses)
            if raytrain.available():
                steps = repeats + 1  # the first is its warm-up
                ray_train = {"steps": steps, "losses": {"shardprop": our_losses(local, steps)}}
        if connect_ray(None, max(workers, default=2)):  # one Ray runtime for every group below
            import ray

            cleanup.callback(ray.shutdown)
        for k in (k for k in workers if k):
            name = f"{k} Ray worker(s)"
            here, there = beside_local(local, workload.config(k), repeats)
            timings[f"in-process step, beside {name}"] = Timing.over(here)
            timings[name] = Timing.over(there)
            rounds[name] = {"in-process step": here, "Ray workers": there}
            timings[f"{name}{EXACT}"] = timed(workload.config(k, reduction="exact"), repeats)
        local.group.close()  # its rows are not needed below (closing twice is safe)
        bench_ray_alone(workload, max(repeats, RAY_ALONE_REPEATS), timings)
        if ray_train:  # last: its trainer's processes wind down after fit() returns
            bench_ray_train(start, ray_train, timings, losses)
    result = {
        "workload": asdict(workload),
        "seconds": {name: asdict(t) for name, t in timings.items()},
        "ratios": ratios({name: t.median for name, t in timings.items()}, rounds),
        "losses": losses,
        "rounds": rounds,
    }
    if ray_train:  # the step-by-step losses and start-up of Ray Train's run
        result["ray_train"] = ray_train
    return result


def prepare_one_thread(workload: Workload) -> Prepared:
    """The in-process step on one thread driving all the BLAS threads: made under a limit of
    one, its network runs one part; timed under the workload's limit, its products use every
    BLAS thread and its elementwise passes one core."""
    with threadpool_limits(limits=1):
        return prepare(workload.config(0), workload.seed)


def bench_in_process(
    local: Prepared, workload: Workload, repeats: int, timings: dict[str, Timing]
) -> None:
    """The in-process step against its GEMMs alone, against the exact reduction's and
    against one thread on all the BLAS threads."""
    exact = prepare(workload.config(0, reduction="exact"), workload.seed)
    one_thread = prepare_one_thread(workload)
    worker = local.group.workers[0]
    gemms = gemms_of_step(worker.network, local.theta, worker.batch)
    (
        timings["in-process step"],
        timings["GEMMs alone"],
        timings[f"in-process step{EXACT}"],
        timings[ONE_THREAD],
    ) = Timing.alternating(
        [step(local), gemms, step(exact), step(one_thread)], repeats, pause=BLAS_SPIN_SECONDS
    )
    exact.group.close()
    one_thread.group.close()


def bench_peers(
    start: SameStart,
    threads: int,
    repeats: int,
    timings: dict[str, Timing],
    losses: dict[str, float],
) -> None:
    """scikit-learn's epoch and PyTorch's step from our start, where they are installed."""
    if (epoch := sklearn_epoch(start, repeats)) is not None:
        timings[SKLEARN_EPOCH], losses["scikit-learn"] = epoch
    if (eager := torch_step(start, threads, repeats)) is not None:
        timings[TORCH_STEP], losses["PyTorch"] = eager


def bench_ray_train(
    start: SameStart,
    ray_train: dict[str, Any],
    timings: dict[str, Timing],
    losses: dict[str, float],
) -> None:
    """Ray Train's DDP step from the same start; its losses step by step beside ours, and
    its fit()'s moments, go into `ray_train`."""
    run = raytrain.fit_ray_train(start, ray_train["steps"])
    timings[RAY_TRAIN_STEP] = run.step
    losses["Ray Train"] = run.losses[0]
    ray_train["losses"]["Ray Train"] = run.losses
    ray_train["fit_to"] = {
        "training function": run.to_train_function,
        "first step (ready)": run.to_first_step,
        "first step done": run.to_first_step_done,
        "return": run.to_return,
    }


def bench_ray_alone(workload: Workload, repeats: int, timings: dict[str, Timing]) -> None:
    """Ray's own cost per step: a step without the math, on each transport."""
    for transport, name in TRANSPORTS.items():
        timings[f"Ray alone, 2 workers, {name}"] = timed(
            workload.config(2, transport), repeats, "null_gradient"
        )


def ratios(median: dict[str, float], rounds: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """The comparisons the targets are stated in. Ray workers timed in turns with the
    in-process step: the median of their ratio round by round, which a drift of the host
    over the rounds leaves alone."""
    local = median["in-process step"]
    out = {"in-process step / GEMMs alone": local / median["GEMMs alone"]}
    for name, seconds in median.items():
        if name in (SKLEARN_EPOCH, TORCH_STEP):
            out[f"in-process step / {name}"] = local / seconds
        elif name in rounds:
            here, there = rounds[name]["in-process step"], rounds[name]["Ray workers"]
            out[f"{name} / in-process step"] = float(np.median(np.divide(there, here)))
        elif name == ONE_THREAD:
            out[f"{ONE_THREAD} / in-process step"] = seconds / local
        elif name.endswith(EXACT):
            out[f"{name} / rank order"] = seconds / median[name.removesuffix(EXACT)]
    two = "2 Ray worker(s) / in-process step"
    if two in out and ONE_THREAD in median:  # both ratios were timed in turns
        out[f"2 Ray worker(s) / {ONE_THREAD}"] = out[two] * local / median[ONE_THREAD]
    if RAY_TRAIN_STEP in median:  # target: in-process step / Ray Train DDP step ≤ 0.6
        ddp = median[RAY_TRAIN_STEP]
        out[f"in-process step / {RAY_TRAIN_STEP}"] = local / ddp
        if "2 Ray worker(s)" in median:
            out[f"2 Ray worker(s) / {RAY_TRAIN_STEP}"] = median["2 Ray worker(s)"] / ddp
    return out


def track(result: dict[str, Any], uri: str | None) -> str:
    """The table as an MLflow run of its own (experiment shardprop-bench): the workload as
    params, medians and ratios as metrics, everything as bench.json."""
    from shardprop.service.tracking.tracker import Tracker

    with Tracker.start(uri, "shardprop-bench", None) as tracker:
        tracker.log_params(result["workload"])
        metrics = {f"seconds.{k}": v["median"] for k, v in result["seconds"].items()}
        metrics |= {f"ratio.{k}": v for k, v in result["ratios"].items()}
        fit_to = result.get("ray_train", {}).get("fit_to", {})
        metrics |= {f"seconds.Ray Train fit() to {k}": v for k, v in fit_to.items()}
        tracker.log_metrics(0, {metric_name(k): v for k, v in metrics.items()})
        tracker.log_dict(result, "bench.json")
        return tracker.run_id


def metric_name(text: str) -> str:
    """MLflow metric names take letters, digits and _ - . / and spaces only."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def render(result: dict[str, Any]) -> list[str]:
    w = result["workload"]
    lines = [
        f"workload: {w['rows']:,} rows x {w['features']} -> {list(w['hidden'])} -> 1, "
        f"{w['dtype']}, {w['threads']} BLAS threads in-process, 1 per Ray worker",
        f"{'':44} {'median':>10} {'min':>10} {'max':>10}",
    ]
    for name, t in result["seconds"].items():
        lines.append(
            f"{name:44} {t['median'] * 1e3:8.2f}ms {t['low'] * 1e3:8.2f}ms {t['high'] * 1e3:8.2f}ms"
        )
    lines += [f"{name:64} {value:6.3f}" for name, value in result["ratios"].items()]
    lines += [
        f"loss at the starting weights (the step's forward pass), {k}: {v:.12f}"
        for k, v in result["losses"].items()
    ]
    if "ray_train" in result:
        lines += render_ray_train(result["ray_train"])
    return lines


def render_ray_train(ray_train: dict[str, Any]) -> list[str]:
    """Its last step's loss beside ours (the gradient and its averaging, not only the
    forward pass) and how long its fit() took to get going, Ray already running."""
    steps, losses = ray_train["steps"], ray_train["losses"]
    lines = [
        f"loss at step {steps}'s forward pass ({steps - 1} SGD steps on), {k}: {v[-1]:.12f}"
        for k, v in losses.items()
    ]
    moments = ", ".join(f"{k} {v:.2f} s" for k, v in ray_train["fit_to"].items())
    return [*lines, f"Ray Train from fit() to: {moments}"]
