"""`shardprop bench`: one full-batch step of the standard workload, in this process and on 1,
2 and 4 Ray workers, against the same step's matrix products alone and against Ray alone
(a step without the math); scikit-learn's full-batch epoch, PyTorch's eager step and Ray
Train's DDP step (TorchTrainer, 2 × 1 CPU, gloo) beside it when they are installed.

Every figure is a median over repeats (with min and max), and every comparison is a ratio
between figures taken in the same run: the machines are noisy, their ratios much less so.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from shardprop.service.bench import raytrain
from shardprop.service.bench.timing import (
    BLAS_SPIN_SECONDS,
    Timing,
    alternating_seconds,
    gemms_of_step,
)
from shardprop.service.bench.workers import BenchWorker
from shardprop.service.cluster.group import WorkerGroup, start_group
from shardprop.service.cluster.runtime import connect_ray
from shardprop.service.config import Config, load_config
from shardprop.service.training.reduce import batch_mean, reduce_sums
from shardprop.service.training.run import make_plan, set_up_workers
from shardprop.workers.network.backprop import Architecture
from shardprop.workers.network.params import init_params

LEARNING_RATE = 0.1
RAY_TRAIN_STEP = "Ray Train DDP step"
EXACT = ", exact reduction"  # train.reduction: exact, beside the same figure in rank order
# rounds at least, for Ray workers against the in-process step, whose ratio is near 1: one
# round's ratio swings by +-5 % on these VMs, the median of 15 still by +-1.5 % from run to
# run (2 workers: 0.980-1.006), of 41 by +-0.5 % (0.978-0.989, five runs)
PAIRED_REPEATS = 41
# the in-process step the issue timed ("careful numpy", its target's reference): one thread,
# its products on all the BLAS threads, against which two single-thread workers were to win
ONE_THREAD = "in-process step on one thread"
TRANSPORTS = {"compiled": "compiled graph", "plain": "plain actor calls"}
IDLE_SECONDS = 0.01  # a pause before each timed run, so that nothing still spins beside it


@dataclass(frozen=True)
class Workload:
    rows: int = 200_000
    features: int = 64
    hidden: tuple[int, ...] = (256, 256)
    dtype: str = "float64"
    threads: int = 2  # BLAS threads of the in-process step (and of the peers)
    seed: int = 0

    def config(
        self,
        workers: int,
        transport: str = "compiled",
        reduction: str = "rank_order",
    ) -> Config:
        data = (
            f"data.synthetic={{name: blobs, rows: {self.rows}, features: {self.features}, "
            f"classes: 2, seed: {self.seed}}}"
        )
        return load_config(
            None,
            [data, f"model.hidden={list(self.hidden)}", f"model.dtype={self.dtype}"],
            {
                "cluster.workers": workers,
                "cluster.cpus_per_worker": 1,
                "cluster.transport": transport,
                "train.reduction": reduction,
                "tracking.enabled": False,
            },
        )


@dataclass
class Prepared:
    group: WorkerGroup
    theta: np.ndarray
    arch: Architecture


def prepare(config: Config, seed: int, method: str = "gradient") -> Prepared:
    """Workers holding their shards and networks, and the transport of the `method` step set up
    (compiled), as a run has them before its first step."""
    plan = make_plan(config)
    group = start_group(plan, config.cluster, BenchWorker)
    _, _, arch = set_up_workers(group, plan, config)
    theta = init_params(arch.layout, "he", seed, config.model.dtype)
    group.prepare_steps(theta, method)
    return Prepared(group, theta, arch)


def step(prepared: Prepared, method: str = "gradient") -> Callable[[], float]:
    """What the coordinator does per step before the optimizer: call, gather, reduce."""

    def run() -> float:
        return batch_mean(reduce_sums(prepared.group.call(method, prepared.theta))).loss

    return run


def timed(config: Config, repeats: int, method: str = "gradient") -> Timing:
    """The `method` step of fresh workers for `config`, which are closed after."""
    prepared = prepare(config, 0, method)
    try:
        return Timing.alternating([step(prepared, method)], repeats)[0]
    finally:
        prepared.group.close()


def beside_local(
    local: Prepared, config: Config, repeats: int, settle: float = IDLE_SECONDS
) -> tuple[list[float], list[float]]:
    """The seconds of the in-process step and of fresh workers' step for `config`, taken in
    turns, round by round. Timed minutes apart, their ratio moved with the host's drift by
    more than the gap between them; in turns, the same drift falls on both. Each starts
    after the workers' poll for the next request has ended (they would spin on the cores
    the in-process step computes on); their idle ticks, 0.3 % of a core each, still fall on
    the in-process step alone. A `local` whose one thread drives several BLAS threads needs
    `settle` = BLAS_SPIN_SECONDS: their spinning after it would fall on the workers."""
    prepared = prepare(config, 0)
    try:
        runs = [step(local), step(prepared)]
        here, there = alternating_seconds(runs, max(repeats, PAIRED_REPEATS), settle)
        return here, there
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
    with threadpool_limits(limits=workload.threads):
        local = prepare(workload.config(0), workload.seed)
        try:
            bench_in_process(local, workload, repeats, timings)
            losses["shardprop"] = step(local)()
            if peers:
                losses |= bench_sklearn(local, workload, repeats, timings)
                losses |= bench_torch(local, workload, repeats, timings)
                if raytrain.available():
                    start = raytrain.same_start(local)
                    steps = repeats + 1  # the first is its warm-up
                    ours = raytrain.our_losses(local, steps, LEARNING_RATE)
                    ray_train = {"steps": steps, "losses": {"shardprop": ours}}
            started_ray = connect_ray(None, max(workers, default=2))
            try:  # one Ray runtime for every group below
                for k in (k for k in workers if k):
                    name = f"{k} Ray worker(s)"
                    here, there = beside_local(local, workload.config(k), repeats)
                    timings[f"in-process step, beside {name}"] = Timing.over(here)
                    timings[name] = Timing.over(there)
                    rounds[name] = {"in-process step": here, "Ray workers": there}
                    config = workload.config(k, reduction="exact")
                    timings[f"{k} Ray worker(s){EXACT}"] = timed(config, repeats)
                local.group.close()  # its rows are not needed below (closing twice is safe)
                bench_ray_alone(workload, max(repeats, 50), timings)
                if ray_train:  # last: its trainer's processes wind down after fit() returns
                    bench_ray_train(start, ray_train, timings, losses)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
        finally:
            local.group.close()
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
    """The in-process step as the issue measured it: one thread driving all the BLAS threads
    (made under a limit of one, its network runs one part; timed under the workload's limit,
    its products use every BLAS thread, its elementwise passes one core)."""
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
        [step(local), gemms, step(exact), step(one_thread)], repeats, settle=BLAS_SPIN_SECONDS
    )
    exact.group.close()
    one_thread.group.close()


def bench_ray_train(
    start: Any, ray_train: dict[str, Any], timings: dict[str, Timing], losses: dict[str, float]
) -> None:
    """Ray Train's DDP step from the same start; its losses step by step beside ours, and
    its fit()'s moments, go into `ray_train`."""
    run = raytrain.fit_ray_train(start, ray_train["steps"], LEARNING_RATE)
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
        if name.startswith(("scikit-learn", "PyTorch")):
            out[f"in-process step / {name}"] = local / seconds
        elif name in rounds:
            here, there = rounds[name]["in-process step"], rounds[name]["Ray workers"]
            out[f"{name} / in-process step"] = float(np.median(np.divide(there, here)))
        elif name == ONE_THREAD:
            out[f"{ONE_THREAD} / in-process step"] = seconds / local
        elif name.endswith(EXACT):  # the exact reduction's cost: the default if <= 1.03
            out[f"{name} / rank order"] = seconds / median[name.removesuffix(EXACT)]
    two = "2 Ray worker(s) / in-process step"
    if two in out and ONE_THREAD in median:  # both ratios were timed in turns
        out[f"2 Ray worker(s) / {ONE_THREAD}"] = out[two] * local / median[ONE_THREAD]
    if RAY_TRAIN_STEP in median:  # the target: ≤ 0.6
        ddp = median[RAY_TRAIN_STEP]
        out[f"in-process step / {RAY_TRAIN_STEP}"] = local / ddp
        if "2 Ray worker(s)" in median:
            out[f"2 Ray worker(s) / {RAY_TRAIN_STEP}"] = median["2 Ray worker(s)"] / ddp
    return out


def bench_sklearn(
    local: Prepared, workload: Workload, repeats: int, timings: dict[str, Timing]
) -> dict[str, float]:
    """scikit-learn's MLPClassifier, one full-batch SGD epoch (batch_size = all rows,
    momentum 0, no L2) from the same weights on the same standardised rows."""
    try:
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        return {}
    batch = local.group.workers[0].batch
    X = np.ascontiguousarray(batch.X1[:-1].T)  # (rows, features), as scikit-learn wants
    y = batch.Y[0].astype(np.int64)
    model = MLPClassifier(
        hidden_layer_sizes=workload.hidden,
        activation="relu",
        solver="sgd",
        batch_size=len(y),
        learning_rate_init=LEARNING_RATE,
        momentum=0.0,
        alpha=0.0,
        shuffle=False,
    )
    model.partial_fit(X[:2], y[:2], classes=[0, 1])  # shapes and dtypes only
    blocks = local.arch.layout.blocks(local.theta)

    def start_from_ours() -> None:
        model.coefs_ = [block[:, :-1].T.astype(X.dtype) for block in blocks]
        model.intercepts_ = [block[:, -1].astype(X.dtype) for block in blocks]

    def epoch() -> None:
        start_from_ours()
        model.partial_fit(X, y)

    timings["scikit-learn MLPClassifier epoch"] = Timing.alternating([epoch], repeats)[0]
    epoch()
    return {"scikit-learn": float(model.loss_)}


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


def bench_torch(
    local: Prepared, workload: Workload, repeats: int, timings: dict[str, Timing]
) -> dict[str, float]:
    """PyTorch CPU eager, the same model, one full-batch SGD step from the same weights on
    the same rows, as many threads (when PyTorch is installed)."""
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(workload.threads)
    batch = local.group.workers[0].batch
    X = torch.from_numpy(np.ascontiguousarray(batch.X1[:-1].T))
    y = torch.from_numpy(np.ascontiguousarray(batch.Y[0]))
    blocks = local.arch.layout.blocks(local.theta)
    model = raytrain.torch_network(blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.0)
    loss_of = torch.nn.BCEWithLogitsLoss()

    def one_step() -> float:
        raytrain.load_blocks(model, blocks)  # every step from the same weights
        optimizer.zero_grad()
        loss = loss_of(model(X).squeeze(1), y)
        loss.backward()
        optimizer.step()
        return float(loss.item())

    timings["PyTorch CPU eager step"] = Timing.alternating([one_step], repeats)[0]
    return {"PyTorch": one_step()}


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
