"""The training run: plan -> workers -> loop (gradient, reduce, step, log, checkpoint) -> model.

Reads top to bottom like the algorithm. Never imports Ray: the worker group hides whether
the shards live in this process or in Ray actors.
"""

import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from math import sqrt
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from shardprop.service.cluster.capacity import estimate_run, fit_problem, nodes_before_ray
from shardprop.service.cluster.group import WorkerGroup, start_group
from shardprop.service.cluster.kept import KeptWorkers
from shardprop.service.config import Config
from shardprop.service.data.lineage import input_record, shard_records
from shardprop.service.data.plan import DataPlan, plan_data
from shardprop.service.data.prepare import DataSetup, decide
from shardprop.service.errors import ConfigError, DivergenceError, TrainingError
from shardprop.service.tracking.page import (
    ALLREDUCE_SECONDS,
    ELAPSED_SECONDS,
    FUNCTION_EVALS,
    GRAD_NORM,
    LEARNING_RATE,
    READ_SECONDS,
    RESIZES_TAG,
    SAMPLES_PER_SECOND,
    STEP_LENGTH,
    STEP_SECONDS,
    STOPPED_TAG,
    STRAGGLER_RATIO,
    WORKERS,
    blas_tag,
    flatten,
    in_force,
    model_name,
    result_words,
    run_description,
    version_tags,
    worker_metric,
)
from shardprop.service.tracking.plots import (
    plot_confusion,
    plot_history,
    plot_timing,
    save_confusion_json,
)
from shardprop.service.tracking.store import StoreError, check_store, check_writable
from shardprop.service.tracking.untracked import Recorder, Untracked
from shardprop.service.training.checkpoint import (
    Checkpoint,
    go_on,
    latest_checkpoint,
    save_checkpoint,
    weights_fingerprint,
)
from shardprop.service.training.early_stop import EarlyStopping, Plateau
from shardprop.service.training.interrupts import Interrupted, StopRequests, stop_requests
from shardprop.service.training.lbfgs import LBFGS
from shardprop.service.training.metrics import confusion_matrix, roc_auc, task_metrics
from shardprop.service.training.optim import make_optimizer
from shardprop.service.training.output import OutputFolder
from shardprop.service.training.progress import Reporter
from shardprop.service.training.reduce import BatchMean, batch_mean, reduce_sums
from shardprop.service.training.schedule import learning_rate
from shardprop.workers.chaos import InjectedFailure
from shardprop.workers.data.columns import NUMERIC, numbers, plain
from shardprop.workers.data.source import Source
from shardprop.workers.data.synthetic import SyntheticSpec
from shardprop.workers.network.backprop import Architecture
from shardprop.workers.network.chunks import chunk_columns
from shardprop.workers.network.losses import l2_penalty, sum_of_squares
from shardprop.workers.network.params import (
    Layout,
    fingerprint,
    init_params,
    load_weights,
    save_weights,
)
from shardprop.workers.reduction.sums import ShardSums
from shardprop.workers.shard import ShardStats

RUNS_FOLDER = Path(".shardprop") / "runs"
INPUT_TAG = "shardprop.input"  # a run's outputs by default: RUNS_FOLDER/<run id>


@dataclass
class RunResult:
    run_id: str
    tracking_uri: str | None
    arch: Architecture
    theta: np.ndarray
    setup: DataSetup
    output: Path
    final: dict[str, float]
    history: dict[str, list[float]] = field(default_factory=dict)
    weights_sha256: str = ""  # of theta
    compute_fraction: float = 0.0  # of the loop's wall time: see compute_fraction()
    steps: dict[str, list[int]] = field(default_factory=dict)  # the step of each history value
    registered: str | None = None  # models:/<name>/<version> with tracking.register_model


def open_tracker(config: Config, resume_run: str | None = None) -> Recorder:
    track = config.tracking
    if not track.enabled:
        return Untracked()
    # MLflow takes a while to import: only when tracking
    from shardprop.service.tracking.tracker import Tracker

    if resume_run:
        return Tracker.reopen(track.uri, resume_run, track.flush_seconds)
    # MLflow shows a run with this tag under its parent
    nested = {"mlflow.parentRunId": track.parent_run} if track.parent_run else {}
    return Tracker.start(
        track.uri,
        track.experiment,
        track.run_name,
        track.tags | nested,
        flush_seconds=track.flush_seconds,
    )


def make_plan(
    config: Config, table: pa.Table | None = None, source: Source | None = None
) -> DataPlan:
    """The data plan of `config`; `table`: rows in memory, in place of a synthetic set;
    `source`: data.path's rows, already read into Ray's object store (Source.loaded)."""
    data = config.data
    synthetic = SyntheticSpec(**data.synthetic.model_dump()) if data.synthetic else None
    return plan_data(
        data.path,
        None if table is not None else synthetic,
        data.label,
        data.features,
        config.cluster.workers,
        filesystem=data.filesystem.model_dump(),
        exact=config.train.reduction == "exact",
        block_rows=config.train.block_rows,
        categorical=data.categorical,
        table=table,
        # the widest layer decides the chunk; the output's width may not be known yet
        chunk=chunk_columns((0, *config.model.hidden, 1), config.model.dtype),
        source=source,
    )


def set_up_workers(
    group: WorkerGroup, plan: DataPlan, config: Config
) -> tuple[list[ShardStats], DataSetup, Architecture]:
    """Each worker reads its rows; the task, classes and standardisation are decided from
    all of them together; then each worker builds its network on its rows."""
    data = config.data
    loaded = group.call(
        "load", data.validation_fraction, config.train.seed, data.missing, config.model.dtype
    )
    setup = decide(loaded, plan.columns, data, plan.left_out)
    sizes = (setup.width, *config.model.hidden, setup.outputs)
    arch = Architecture(sizes, config.model.activation, setup.task)
    group.call(
        "prepare",
        arch,
        config.model.dtype,
        setup.columns,
        setup.classes,
        setup.mean,
        setup.std,
        setup.target,
    )
    return loaded, setup, arch


def initial_parameters(layout: Layout, config: Config, init_weights: Path | None) -> np.ndarray:
    """Seeded draw, or a weights file that must fit the configured network."""
    if init_weights is not None:
        return load_weights(init_weights, layout, config.model.dtype)[1]
    return init_params(layout, config.model.init, config.train.seed, config.model.dtype)


def model_meta(arch: Architecture, config: Config, plan: DataPlan, setup: DataSetup) -> dict:
    """What a prediction needs besides the weights; travels as JSON, never as pickle."""
    return {
        "sizes": list(arch.sizes),
        "activation": arch.activation,
        "task": arch.task,
        "dtype": config.model.dtype,
        "features": list(plan.features),
        "label": plan.label,
        "mean": None if setup.mean is None else setup.mean.tolist(),
        "std": None if setup.std is None else setup.std.tolist(),
        "classes": setup.classes,
        "columns": [column.as_json() for column in setup.columns],
        "missing": config.data.missing,
        "target": None if setup.target is None else list(setup.target),
    }


def objective(
    parts: list[ShardSums], theta: np.ndarray, layout: Layout, l2: float
) -> tuple[BatchMean, float, np.ndarray]:
    """The reduced batch mean, and the loss and gradient with the L2 term added once (the
    gradient is empty for the sums of a forward-only evaluation)."""
    mean = batch_mean(reduce_sums(parts))
    if not l2:
        return mean, mean.loss, mean.grad
    # data-free, so added here after the reduce and never by a worker
    penalty, penalty_grad = l2_penalty(theta, layout.weight_mask, l2)
    if not mean.grad.size:  # forward only: no gradient to add to
        return mean, mean.loss + penalty, mean.grad
    return mean, mean.loss + penalty, mean.grad + penalty_grad


def prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{key}": value for key, value in arrays.items()}


def records_to_arrays(records: list[tuple[int, dict[str, float]]]) -> dict[str, np.ndarray]:
    """Every step's metrics as columns (NaN where a step has no such metric), for a checkpoint:
    a resumed run re-logs whatever the store had not received before the crash."""
    names = sorted({name for _, metrics in records for name in metrics})
    arrays = {"steps": np.array([step for step, _ in records], dtype=np.int64)}
    for name in names:
        arrays[name] = np.array([metrics.get(name, np.nan) for _, metrics in records])
    return arrays


def records_from_arrays(arrays: dict[str, np.ndarray]) -> list[tuple[int, dict[str, float]]]:
    steps = arrays.pop("steps", np.empty(0, dtype=np.int64))
    return [
        (int(step), {name: float(v[i]) for name, v in arrays.items() if not np.isnan(v[i])})
        for i, step in enumerate(steps)
    ]


def split_metrics(
    mean: BatchMean, loss: float, setup: DataSetup | None, prefix: str = ""
) -> dict[str, float]:
    """The metrics people read of one split. With the run's `setup`: in the label's units (a
    regression trained on standardised targets reports its loss times their variance) and
    the task's own metrics; without: as the network computes them (verify's finite
    differences)."""
    std = setup.target[1] if setup and setup.target else 1.0
    metrics = {f"{prefix}loss": loss * std**2}
    if mean.accuracy is not None:
        metrics[f"{prefix}accuracy"] = mean.accuracy
    if setup:
        metrics |= task_metrics(setup.task, mean.tallies, mean.rows, std, prefix)
    return metrics


def auc(group: WorkerGroup, theta: np.ndarray, split: str) -> float:
    """ROC AUC over every row of a split: the workers' scores joined in rank order are the
    same array, row for row, for any worker count."""
    parts = group.call("scores", theta, split)
    return roc_auc(np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts]))


def validate(
    group: WorkerGroup, theta: np.ndarray, setup: DataSetup | None = None
) -> dict[str, float]:
    """val_loss (data term only), val_accuracy and the task's metrics, reduced over the
    workers' validation rows."""
    mean = batch_mean(reduce_sums(group.call("evaluate", theta, "validation")))
    metrics = split_metrics(mean, mean.loss, setup, "val_")
    if setup and setup.task == "binary":
        metrics["val_roc_auc"] = auc(group, theta, "validation")
    return metrics


# one call on every worker: their sums, and the seconds the call took to gather them
Round = tuple[list[ShardSums], float]


def step_metrics(
    mean: BatchMean,
    loss: float,
    grad: np.ndarray,
    rounds: list[Round],
    timing: tuple[float, float, int],
    setup: DataSetup | None = None,
) -> dict[str, float]:
    """The per-step metrics, from the step's reduce, the rounds of calls on the workers it
    made (one for a gradient step, one per trial point of a line search) and `timing`: the
    step's seconds, the reduce's, and the number of ranks."""
    step_seconds, reduce_seconds, ranks = timing
    metrics = split_metrics(mean, loss, setup) | {
        GRAD_NORM: sqrt(sum_of_squares(grad)),
        STEP_SECONDS: step_seconds,
        SAMPLES_PER_SECOND: mean.rows / step_seconds,
    }
    # per round, per rank: (compute seconds, forward seconds); none when the step took the
    # gradient an earlier one had and went no further
    each = [
        np.array([t for part in parts for t in part.timings()]).reshape(-1, 2)
        for parts, _ in rounds
    ]
    slowest = np.array([round_[:, 0].max() for round_ in each] or [0.0])
    gathers = np.array([seconds for _, seconds in rounds] or [0.0])
    # per rank: the rounds of the group's size now (an elastic group may change in a step)
    timings = np.stack([r for r in each if len(r) == ranks] or [np.zeros((ranks, 2))])
    computes = timings[:, :, 0].sum(axis=0)
    metrics |= {
        # beyond the slowest worker's compute, round by round: broadcast, gather and sum
        ALLREDUCE_SECONDS: float((gathers - slowest).sum()) + reduce_seconds,
        STRAGGLER_RATIO: float(max(computes.max(), 1e-12) / max(np.median(computes), 1e-12)),
    }
    for rank in range(timings.shape[1]):
        seconds, forward = timings[:, rank, 0], timings[:, rank, 1]
        metrics[worker_metric(rank, "forward_seconds")] = float(forward.sum())
        metrics[worker_metric(rank, "backward_seconds")] = float((seconds - forward).sum())
        # waiting for the slowest worker, with the transfers
        wait = np.maximum(gathers - seconds, 0.0).sum()
        metrics[worker_metric(rank, "wait_seconds")] = float(wait)
    return metrics


def fit(
    group: WorkerGroup,
    theta: np.ndarray,
    layout: Layout,
    config: Config,
    tracker: Recorder,
    reporter: Reporter,
    checkpoints: Path,
    start: Checkpoint | None = None,
    stop: StopRequests | None = None,
    setup: DataSetup | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[int]], EarlyStopping | None]:
    """Full-batch training; theta is updated in place (to the best weights when early
    stopping is on). From `start`, it goes on exactly as the run that wrote it would have.
    `setup`: the run's data, for the metrics in the label's units. Returns the metric
    history, the step of each of its values (validation metrics come every eval_every
    steps) and the early-stopping record."""
    train = config.train
    optimizer = make_optimizer(train, layout.size, theta.dtype)
    stopper = EarlyStopping(train.patience) if config.data.validation_fraction else None
    plateau = Plateau(train.tolerance, train.n_iter_no_change)
    records: list[tuple[int, dict[str, float]]] = []  # (step, metrics) as logged
    history: dict[str, list[float]] = {}
    steps: dict[str, list[int]] = {}
    # the training loss in the label's units, as logged and as train.target_loss reads it
    label_units = setup.target[1] ** 2 if setup and setup.target else 1.0

    def record(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(step, metrics)  # a resumed run's tracker skips what it has
        records.append((step, metrics))
        for name, value in metrics.items():
            history.setdefault(name, []).append(value)
            steps.setdefault(name, []).append(step)

    # a step's metrics are worked out, recorded and shown while the workers compute the
    # next one; logged before anything reads the records, and when the loop ends however
    # it ends
    pending_logs: list[Callable[[], None]] = []

    def log_pending() -> None:
        while pending_logs:  # in step order
            pending_logs.pop(0)()

    def report(step: int, metrics: dict[str, float], *measured: Any) -> None:
        metrics |= step_metrics(*measured, setup=setup)
        record(step, metrics)
        # the bar's samples/s, under the name progress.describe reads
        reporter.update(step, metrics)

    first_step, last_checkpoint = 1, None
    # "step S: k -> k' workers: cause", as tagged; a resumed run's go on from its checkpoint
    resizes: list[str] = []
    if start is not None:
        theta[...] = start.theta
        optimizer.load_state(start.part("optimizer"))
        if stopper:
            stopper.load_state(start.part("early_stopping"))
        if saved := start.part("plateau"):
            plateau.load_state(saved)
        for step, metrics in records_from_arrays(start.part("metrics")):
            record(step, metrics)
        resizes.extend(map(str, start.part("elastic").get("resizes", [])))
        first_step, last_checkpoint = start.step + 1, start.folder
    chaos = config.cluster.inject_failure
    injected = InjectedFailure.parse(chaos) if chaos else None
    restarts = 0
    elastic = config.cluster.smallest != config.cluster.largest
    tagged = 0  # the group's changes in `resizes` so far
    stop = stop or StopRequests()
    watch = DivergenceWatch(train.divergence_factor, history.get("loss", []))
    done = first_step - 1  # steps applied to theta

    def write_checkpoint(step: int) -> Path:
        state = (
            prefixed("optimizer", optimizer.state())
            | prefixed("plateau", plateau.state())
            | prefixed("metrics", records_to_arrays(records))
        )
        if stopper:
            state |= prefixed("early_stopping", stopper.state())
        if resizes:
            state["elastic.resizes"] = np.array(resizes)
        try:
            folder = save_checkpoint(checkpoints, step, layout, theta, state)
        except OSError as error:
            raise TrainingError(
                f"could not write the checkpoint of step {step} to {checkpoints} "
                f"({error.strerror or error})"
            ) from None
        # uploaded by the tracker's writer, off this loop
        tracker.log_checkpoint(folder, weights_fingerprint(folder))
        return folder

    def logged_pending() -> None:
        with stop.deferred():  # a step's metrics are recorded whole
            log_pending()

    rounds: list[Round] = []  # the current step's calls on the workers

    def call(method: str, point: np.ndarray) -> list[ShardSums]:
        """One round: `method` at `point` on every worker. Waits on the workers: a signal
        here ends the run at the last step taken."""
        began = time.perf_counter()
        parts = group.call(method, point, while_waiting=logged_pending)
        rounds.append((parts, time.perf_counter() - began))
        return parts

    # lbfgs: the gradient its line search took at the weights it settled on, which is the
    # next step's gradient: [(those weights, the workers' sums)]
    searched: list[tuple[np.ndarray, list[ShardSums]]] = []

    def evaluate(point: np.ndarray, with_gradient: bool) -> tuple[float, np.ndarray | None]:
        """lbfgs's evaluation of a trial point: forward only, or with the gradient."""
        parts = call("gradient" if with_gradient else "evaluate", point)
        if with_gradient:
            searched[:] = [(point, parts)]
        _, loss, grad = objective(parts, point, layout, train.l2)
        return loss, grad if with_gradient else None

    stopped = ""  # why the run ended before its last step
    loop_started = time.perf_counter()
    try:
        for step in range(first_step, train.steps + 1):
            metrics: dict[str, float] = {}
            if injected and step == injected.step:
                group.inject(injected)
            if elastic:
                group.grow()  # room for more workers: at this boundary, between two steps
            if stopper and (step % train.eval_every == 0 or step == train.steps):
                # measured at the parameters this step's gradient is taken at, as `loss` is
                metrics = validate(group, theta, setup)
                with stop.deferred():
                    if stopper.update(step, metrics["val_loss"], theta):
                        log_pending()
                        record(step, metrics)
                        break
            started = time.perf_counter()
            rounds = []
            if searched and same_bits(searched[0][0], theta):
                parts = searched[0][1]
            else:
                parts = call("gradient", theta)
            searched.clear()
            metrics[ELAPSED_SECONDS] = time.perf_counter() - loop_started
            reducing = time.perf_counter()
            mean, loss, grad = objective(parts, theta, layout, train.l2)
            reduce_seconds = time.perf_counter() - reducing
            watch.check(step, loss, grad)
            target = train.target_loss
            reached = target is not None and loss * label_units <= target
            proposal = None
            if isinstance(optimizer, LBFGS) and not reached:
                # its evaluations wait on the workers too: stopped here, theta is unchanged
                proposal = optimizer.propose(theta, loss, grad, evaluate)
            with stop.deferred():  # the update, its records and its checkpoint, whole
                if reached:
                    stopped = f"the training loss reached train.target_loss at step {step}"
                elif isinstance(optimizer, LBFGS):
                    metrics[FUNCTION_EVALS] = len(rounds)
                    if proposal is None:
                        stopped = f"no lower loss along the search direction at step {step}"
                    else:
                        metrics[STEP_LENGTH] = proposal.step_length
                        optimizer.take(theta, grad, proposal)
                else:
                    metrics[LEARNING_RATE] = rate = learning_rate(train, step)
                    optimizer.step(theta, grad, rate)
                if not stopped:
                    done = step
                    if plateau.update(loss):
                        stopped = (
                            f"the training loss has not gone down by train.tolerance "
                            f"({train.tolerance:g}) for more than train.n_iter_no_change "
                            f"({train.n_iter_no_change}) steps, at step {step}"
                        )
                timing = (time.perf_counter() - started, reduce_seconds, group.size)
                if group.restarts != restarts:
                    restarts = metrics["worker_restarts"] = group.restarts
                if elastic:
                    metrics[WORKERS] = group.size
                    if changes := group.changes[tagged:]:
                        for change in changes:
                            resizes.append(f"step {step}: {change}")
                            reporter.note(resizes[-1])
                        tagged += len(changes)
                        tracker.set_tags({RESIZES_TAG: "; ".join(resizes)})
                pending_logs.append(
                    functools.partial(report, step, metrics, mean, loss, grad, rounds, timing)
                )
                if train.checkpoint_every and done == step and step % train.checkpoint_every == 0:
                    log_pending()
                    last_checkpoint = write_checkpoint(step)
            if stopped:
                reporter.note(f"stopped early: {stopped}")
                tracker.set_tags({STOPPED_TAG: stopped})
                break
    except Interrupted as error:
        log_pending()
        if done >= first_step and (
            last_checkpoint is None or last_checkpoint.name != f"step-{done:06d}"
        ):
            write_checkpoint(done)  # a step taken in this process is kept
        taken = f"after step {done}" if done else "before the first step"
        raise Interrupted(error.signum, f"{error} {taken}") from None
    finally:
        log_pending()
    if stopper and train.patience and stopper.best_theta is not None:
        theta[...] = stopper.best_theta  # early stopping keeps the best weights
    return history, steps, stopper


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


class DivergenceWatch:
    """A run diverges when its loss is not finite, or (with a `factor`) grows past `factor`
    times its best and above where it started: finite, but going nowhere good."""

    def __init__(self, factor: float | None, losses: list[float]):
        self.factor = factor
        self.first = losses[0] if losses else None
        self.best = min(losses, default=np.inf)

    def check(self, step: int, loss: float, grad: np.ndarray) -> None:
        if not (np.isfinite(loss) and np.all(np.isfinite(grad))):
            self._raise(step, f"loss {loss}")
        if self.first is None:
            self.first = loss
        if self.factor and loss > self.factor * self.best and loss > self.first:
            self._raise(
                step, f"loss {loss:.4g}, over {self.factor:g} times its best {self.best:.4g}"
            )
        self.best = min(self.best, loss)

    @staticmethod
    def _raise(step: int, what: str) -> None:
        raise DivergenceError(
            step, f"training diverged at step {step} ({what}); try a lower train.learning_rate"
        )


def compute_fraction(history: dict[str, list[float]], steps: int, loop_seconds: float) -> float:
    """The share of the loop's wall time that went to the slowest worker's gradient, step by
    step: what the coordinator, the all-reduce, logging and checkpoints leave to the math.
    Over the last `steps` steps (a resumed run's earlier ones ran in another process), but
    the first of them, which warms the workers up."""
    # the ranks that took every step (an elastic run's rank 0 at least)
    ranks = {
        name.split("/")[0]
        for name, values in history.items()
        if name.endswith("/forward_seconds") and len(values) == len(history[STEP_SECONDS])
    }
    if steps < 2 or not ranks:
        return 0.0
    computes = np.array(
        [
            np.add(history[f"{rank}/forward_seconds"], history[f"{rank}/backward_seconds"])
            for rank in sorted(ranks)
        ]
    )
    loop_seconds -= history[STEP_SECONDS][-steps]
    return float(computes[:, 1 - steps :].max(axis=0).sum() / loop_seconds)


def final_metrics(
    group: WorkerGroup,
    theta: np.ndarray,
    layout: Layout,
    l2: float,
    stopper: EarlyStopping | None,
    setup: DataSetup | None = None,
) -> dict:
    """Loss, accuracy and the task's metrics of the weights the run ends with, on both
    splits."""
    mean = batch_mean(reduce_sums(group.call("evaluate", theta)))
    loss = mean.loss + (l2_penalty(theta, layout.weight_mask, l2)[0] if l2 else 0.0)
    metrics = split_metrics(mean, loss, setup) | {"rows": mean.rows}
    if setup and setup.task == "binary":
        metrics["roc_auc"] = auc(group, theta, "train")
    if stopper is not None:
        metrics |= validate(group, theta, setup)
        metrics["best_step"] = stopper.best_step
    return metrics


def confusion(group: WorkerGroup, theta: np.ndarray, setup: DataSetup, folder: Path) -> list[Path]:
    """The confusion matrix of the final weights, on the validation rows when there are
    some: JSON and PNG in `folder`. Nothing for regression."""
    if setup.classes is None:
        return []
    split = "validation" if setup.val_rows else "train"
    mean = batch_mean(reduce_sums(group.call("evaluate", theta, split)))
    matrix = confusion_matrix(mean.tallies, setup.classes)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        save_confusion_json(matrix, setup.classes, folder / f"confusion_{split}.json"),
        plot_confusion(matrix, setup.classes, folder / f"confusion_{split}.png"),
    ]


def open_run(
    config: Config,
    plan: DataPlan,
    background: ThreadPoolExecutor,
    resume_run: str | None,
    kept: KeptWorkers | None = None,
) -> tuple[Recorder, WorkerGroup]:
    """Open the MLflow run and start the workers at once.

    MLflow's imports and store set-up are slow, and so is Ray's start-up, which mostly
    waits on other processes: done side by side, the run starts sooner.
    """
    opening = background.submit(open_tracker, config, resume_run)
    try:
        group = start_group(
            plan, config.cluster, estimate_for=functools.partial(estimate_run, config), kept=kept
        )
    except BaseException as error:
        if opening.exception() is None:
            tracker = opening.result()
            if isinstance(error, (TrainingError, Interrupted)):
                during = " during start-up" if isinstance(error, Interrupted) else ""
                resumable = plan.source.format != "table"
                go_on = how_to_go_on(error, tracker, None, resumable)
                error.args = (f"{error}{during}{go_on}",)
            tracker.__exit__(type(error), error, error.__traceback__)
        raise
    try:
        return opening.result(), group
    except BaseException:
        group.close()
        raise


def train(
    config: Config,
    init_weights: Path | None = None,
    output: Path | None = None,
    reporter: Reporter | None = None,
    resume_run: str | None = None,
    table: pa.Table | None = None,
    source: Source | None = None,
    kept: KeptWorkers | None = None,
) -> RunResult:
    """One training run; with `resume_run`, that run goes on from its last checkpoint in
    `output` (the same MLflow run, the same config, the same result as if never stopped).
    `table`: the rows in memory, in place of data.path or data.synthetic. `source`: the rows
    of data.path, already read into Ray's object store (a sweep's trials share them).
    `kept`: where a run that ends cleanly leaves its Ray workers for the next run of this
    process, and where it finds the last one's (a sweep's trial process).

    Everything that can be checked is checked before Ray starts (exit 2). A run that fails
    or is stopped later says where its last weights are and how to go on (exit 1, 130, 143).
    """
    reporter = reporter or Reporter("quiet")
    # from the first moment: a signal during start-up stops the run as cleanly as later
    with stop_requests() as stop, ExitStack() as held:
        plan = make_plan(config, table, source)  # metadata: a bad path or column fails first
        estimate = estimate_run(config, plan)
        nodes = nodes_before_ray(config.cluster, estimate.coordinator)  # None: a joined cluster
        if nodes is not None and (problem := fit_problem(estimate, config.cluster, nodes)):
            raise ConfigError(problem)
        if config.tracking.enabled:
            # reachable and writable: seconds, not minutes of MLflow's retries
            check_store(config.tracking.uri, resuming=resume_run is not None)
        folder = None
        if output is not None:
            folder = held.enter_context(OutputFolder(output))
            folder.hold(resume_run)
        else:
            check_writable(RUNS_FOLDER, "--output", "the default output folder")
        with ThreadPoolExecutor(1, thread_name_prefix="tracking") as background:
            tracker, group = open_run(config, plan, background, resume_run, kept)
            with tracker, closing(group):
                if folder is None:
                    folder = held.enter_context(OutputFolder(RUNS_FOLDER / tracker.run_id))
                    folder.hold(None)
                folder.own(tracker.run_id)
                reporter.opened(tracker.run_id, tracker.tracking_uri, folder.path)
                try:
                    return run(
                        config,
                        plan,
                        group,
                        tracker,
                        reporter,
                        background,
                        stop,
                        folder.path,
                        init_weights,
                        resume_run,
                    )
                except (TrainingError, Interrupted) as error:
                    if isinstance(error, StoreError):
                        error.args = (f"the tracking store {tracker.tracking_uri} failed: {error}",)
                    resumable = plan.source.format != "table"
                    go_on = how_to_go_on(error, tracker, folder.path, resumable)
                    error.args = (f"{error}{go_on}",)
                    raise


def how_to_go_on(
    error: Exception, tracker: Recorder, output: Path | None, resumable: bool = True
) -> str:
    """Where the last good weights are, and the command that goes on from them. Not
    `resumable`: rows given in memory, which a resume cannot read again."""
    # a resume would diverge again, or has no run or rows to go on with: use the files
    gone_on = isinstance(error, DivergenceError) or not resumable
    return go_on(output, None if gone_on else tracker.run_id, tracker.tracking_uri)


def run(
    config: Config,
    plan: DataPlan,
    group: WorkerGroup,
    tracker: Recorder,
    reporter: Reporter,
    background: ThreadPoolExecutor,
    stop: StopRequests,
    output: Path,
    init_weights: Path | None,
    resume_run: str | None,
) -> RunResult:
    """Set up the workers, train, and save the model: the run once its resources are held."""
    loaded, setup, arch = set_up_workers(group, plan, config)
    for note in setup.notes:
        reporter.note(note)
    start = None
    if resume_run:
        layout, dtype = arch.layout, config.model.dtype
        start = latest_checkpoint(output / "checkpoints", layout, dtype)
        if start is None:  # the output folder is gone or elsewhere: MLflow has copies
            fetched = tracker.download_checkpoints(output / "fetched")
            start = latest_checkpoint(fetched, layout, dtype)
    theta = initial_parameters(arch.layout, config, init_weights)
    record = input_record(plan, config.data.path)
    description = run_description(
        record,
        setup,
        plan.label,
        arch.sizes,
        arch.layout.size,
        config.resolved(),
        config.cluster.workers,
    )
    if not resume_run:
        placements = group.call("where")
        tracker.set_tags(
            {"shardprop.output": str(output.resolve()), "shardprop.blas": blas_tag(placements)}
            # rows given in memory: `shardprop resume` must refuse, not train on other rows
            | ({INPUT_TAG: "memory"} if plan.source.format == "table" else {})
        )
        tracker.set_note(description)
        tracker.log_config(config.resolved(), run_params(config, plan, setup, arch))
        reads = {worker_metric(r, READ_SECONDS): part.read_seconds for r, part in enumerate(loaded)}
        tracker.log_metrics(0, reads)  # once, before the first step
        tracker.log_lineage(record, shard_records(plan, placements))
    reporter.start(config.train.steps, f"training on {group.size} worker(s)")
    group.compile()  # the transport's set-up is not the first step's time
    loop_started = time.perf_counter()
    try:
        history, steps, stopper = fit(
            group,
            theta,
            arch.layout,
            config,
            tracker,
            reporter,
            output / "checkpoints",
            start,
            stop,
            setup,
        )
    finally:
        reporter.stop()
    loop_seconds = time.perf_counter() - loop_started
    meta = model_meta(arch, config, plan, setup)
    save_model_files(output, arch.layout, theta, meta)  # first: kept whatever fails next
    final = final_metrics(group, theta, arch.layout, config.train.l2, stopper, setup)
    confusion_files = confusion(group, theta, setup, output / "confusion")
    steps_run = len(history[STEP_SECONDS]) - (start.step if start else 0)
    fraction = compute_fraction(history, steps_run, loop_seconds)
    weights_sha256 = fingerprint(theta)
    outcome = final | {
        "run_id": tracker.run_id,
        "weights_sha256": weights_sha256,
        "compute_fraction": fraction,
    }
    (output / "metrics.json").write_text(json.dumps(outcome, indent=2))
    tracker.set_tags({"weights_sha256": weights_sha256})
    example = input_example(plan, setup)
    name = model_name(record, plan.label, setup.task)
    logging_model = background.submit(
        tracker.log_final, output / "weights.npz", meta, example, name
    )
    # done with the workers (kept for this process's next run, if it keeps them); Ray's
    # shutdown overlaps MLflow's model logging
    group.close(keep=True)
    logging_model.result()
    description = f"{description}\n\n{result_words(final)}"
    tracker.set_note(description)
    registered = None
    if config.tracking.register_model:
        registered = tracker.register_model(
            config.tracking.register_model, version_tags(final), description
        )
    for path in confusion_files:
        tracker.log_artifact(path, "confusion")
    tracker.log_artifact(plot_history(history, output / "loss.png", steps), "plots")
    tracker.log_artifact(plot_timing(history, output / "timing.png"), "plots")
    return RunResult(
        tracker.run_id,
        tracker.tracking_uri,
        arch,
        theta,
        setup,
        output,
        final,
        history,
        weights_sha256,
        fraction,
        steps,
        registered,
    )


def run_params(
    config: Config, plan: DataPlan, setup: DataSetup, arch: Architecture
) -> dict[str, str | int]:
    """The run's MLflow params: the settings in force (page.in_force), flattened, and the
    sizes the data decided."""
    resolved = config.resolved()
    resolved.pop("sweep")  # what a sweep tries, not what trains this run
    resolved["tracking"].pop("tags", None)  # the run's tags already
    if plan.source.synthetic is None:  # rows from a path, or handed over in memory
        resolved["data"].pop("synthetic", None)
    sizes: dict[str, str | int] = {
        "n_params": arch.layout.size,
        "n_rows": setup.rows,
        "n_inputs": setup.width,
        "workers": config.cluster.workers,
        "task": setup.task,
    }
    if setup.val_rows:
        sizes["n_val_rows"] = setup.val_rows
    if config.data.missing == "drop":
        sizes["n_dropped_rows"] = setup.dropped
    return flatten(in_force(resolved, setup.task)) | sizes


def input_example(plan: DataPlan, setup: DataSetup) -> pa.Table:
    """The first rows as the model's signature should see them: a number column with a
    missing value somewhere as float64 (as pandas reads it: an integer column with nulls
    becomes float64, and MLflow refuses to convert between the two); dictionary columns as
    their values, as MLflow's signature has no categorical type."""
    example = plan.source.read(plan.features, 0, min(5, plan.total_rows))
    return pa.table(
        {
            column.name: numbers(example.column(column.name))
            if column.kind == NUMERIC and column.name in setup.incomplete
            else plain(example.column(column.name))
            for column in setup.columns
        }
    )


def save_model_files(output: Path, layout: Layout, theta: np.ndarray, meta: dict) -> None:
    """DIR/weights.npz and DIR/model.json (what predicting needs besides the weights)."""
    try:
        save_weights(output / "weights.npz", layout, theta)
        (output / "model.json").write_text(json.dumps(meta, indent=2))
    except OSError as error:
        raise TrainingError(
            f"could not write the final weights to {output} ({error.strerror or error})"
        ) from None
