"""A sweep: one shardprop training per trial, run side by side by Ray Tune, each a child of
the sweep's MLflow run.

Each trial is the whole `shardprop train` of the base config with the trial's values set
(so its weights are those `shardprop train` gives that config, to the bit under `exact`).
Its coordinator and its workers are reserved together, as one placement group, so trials
pack the cluster side by side; a trial that fails leaves the others running.
"""

import copy
import functools
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardprop.service.cluster.capacity import worker_request
from shardprop.service.cluster.kept import KeptWorkers
from shardprop.service.cluster.runtime import code_to_ship, connect_ray
from shardprop.service.config import Config, config_from
from shardprop.service.errors import ConfigError, TrainingError
from shardprop.service.sweep.space import one_value, search_space
from shardprop.service.tracking.tracker import register_model, resume_command
from shardprop.service.training.interrupts import Interrupted, stop_requests, stopped_by
from shardprop.service.training.progress import Reporter
from shardprop.service.training.run import make_plan, open_tracker
from shardprop.workers.data.source import Source

SWEEPS_FOLDER = Path(".shardprop") / "sweeps"  # Ray Tune's records of each sweep
BEST_TAG = "shardprop.best_trial"  # on the best child run, and its run id on the parent
COORDINATOR = {"CPU": 1.0}  # a trial's own process, the first bundle of its group
REPORTS = 20  # times a trial reports its metrics to an early-stopping scheduler
ASHA_GRACE_REPORTS = 2  # reports every trial makes before asha may stop it
STEP, FINISHED = "step", "finished"  # in a trial's reports: its step, and that it ran to the end
STOPPED_TAG = "shardprop.stopped"  # why a run ended early
HAND_OVER_SECONDS = 0.2  # how often a signal waiting for Tune's Ctrl-C handler looks for it
TRIAL_TAG = "shardprop.trial"  # on a trial's run: its Ray Tune trial id, to go on with it
PATH_TAG = "shardprop.sweep_path"  # on the sweep's run: Ray Tune's records of it
ROWS_TAG = "shardprop.sweep_rows"  # on the sweep's run: where its trials' rows come from
# in a trial process, the last trial's workers, for the next trial Tune runs in it
KEPT = KeptWorkers()


@dataclass
class Trial:
    run_id: str | None  # its MLflow run, None where it failed before opening one
    values: dict[str, Any]  # the config keys it set
    metric: float | None  # the sweep's metric at the end of the run, or where it stopped
    error: str | None = None
    stopped_at: int | None = None  # the step after which a scheduler stopped it
    seconds: float | None = None  # its time in Ray Tune, start-up included


@dataclass
class SweepResult:
    run_id: str  # the parent MLflow run
    tracking_uri: str
    trials: list[Trial]
    best: Trial | None
    seconds: float
    registered: str | None = None  # models:/<name>/<version>, the best trial's model


def run_trial(
    values: dict[str, Any],
    base: dict[str, Any],
    parent: str,
    folder: str,
    reports: int,
    rows: Source | None,
) -> None:
    """One trial, in Ray Tune's trial process: `shardprop train` of the base config with these
    values, nested under the sweep's run and tagged with the trial's id; a trial that had
    opened its run before the sweep stopped goes on with it from its last checkpoint. Its
    final metrics go back to Tune, and with `reports`, its metrics that many times along the
    way, for a scheduler to judge. `rows`: data.path's rows, read once by the sweep."""
    from ray import tune

    from shardprop.service.training.run import train

    os.chdir(folder)  # relative paths (data, the store, outputs) as the sweep sees them
    logging.getLogger("ray").setLevel(logging.WARNING)  # as in `train`: not Ray's INFO lines
    trial = tune.get_context().get_trial_id()
    config = config_from(
        copy.deepcopy(base),
        {**values, "tracking.parent_run": parent, "tracking.tags": {TRIAL_TAG: trial}},
    )
    every = max(1, config.train.steps // reports) if reports else 0
    reporter = TrialReporter(every, config.train.steps)
    earlier = earlier_run(config, parent, trial)
    if earlier is not None and earlier.info.status == "FINISHED":  # Tune had not heard
        final = {**earlier.data.metrics, STEP: config.train.steps}
        tune.report({**final, "run_id": earlier.info.run_id, FINISHED: True})
        return
    if earlier is not None:
        from shardprop.service.tracking.tracker import recall_run

        recalled = recall_run(config.tracking.uri, earlier.info.run_id)
        config = config_from(recalled.config, {"tracking.uri": recalled.tracking_uri})
        result = train(
            config, None, recalled.output, reporter, recalled.run_id, source=rows, kept=KEPT
        )
    else:
        result = train(config, reporter=reporter, source=rows, kept=KEPT)
    steps = max((step for taken in result.steps.values() for step in taken), default=0)
    tune.report({**result.final, STEP: steps, "run_id": result.run_id, FINISHED: True})


def store_client(config: Config) -> Any:
    """An MLflow client of the sweep's store, as `train` resolves it."""
    from mlflow import MlflowClient

    from shardprop.service.tracking.store import resolve_tracking_uri

    return MlflowClient(resolve_tracking_uri(config.tracking.uri))


def earlier_run(config: Config, parent: str, trial: str) -> Any:
    """The MLflow run this trial opened before its sweep was stopped, if any."""
    client = store_client(config)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.`{TRIAL_TAG}` = '{trial}'",
    )
    return found[0] if found else None


class TrialReporter(Reporter):
    """A trial's progress as Ray Tune results: its metrics every `every` steps (0: never)
    before the last of its `steps`, which the run's end reports. A report waits for Tune's
    answer, and a trial the scheduler stops ends in one."""

    def __init__(self, every: int, steps: int):
        super().__init__("quiet")
        self.every, self.steps = every, steps
        self.run_id: str | None = None

    def opened(self, run_id: str | None, tracking_uri: str | None, output: Path) -> None:
        self.run_id = run_id

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.every and step % self.every == 0 and step < self.steps:
            from ray import tune

            try:
                tune.report({**metrics, STEP: step, "run_id": self.run_id})
            except SystemExit:  # how Ray Tune ends a trial its scheduler stops
                # as a SIGTERM would: the steps taken are checkpointed, the run KILLED
                raise Interrupted(signal.SIGTERM, "stopped by the sweep's scheduler") from None


def trial_bundles(config: Config) -> list[dict[str, float]]:
    """A trial's placement group: its coordinator, then each of its workers."""
    workers = config.cluster.workers
    return [COORDINATOR, *[worker_request(config.cluster)] * workers]


def sweep(config: Config, resume_run: str | None = None) -> SweepResult:
    """Run the sweep `config.sweep` describes over the rest of `config`; the parent run holds
    the sweep's config, the results table and the best trial's id. With `resume_run` (a
    sweep's run that was stopped), Ray Tune's records of it go on: trials that finished stay,
    the others go on from their runs' last checkpoints."""
    from mlflow import MlflowClient

    spec = config.sweep
    if not spec.params:
        raise ConfigError("sweep.params: nothing to try; give --param key=values")
    if not config.tracking.enabled:
        raise ConfigError("tracking.enabled: a sweep's trials are MLflow runs; drop --no-tracking")
    # each trial's config, before its values: the best trial's model alone is registered
    base = config.model_dump(exclude_none=True, exclude={"sweep"})
    base["tracking"].pop("register_model", None)
    for key in spec.params:  # every key a trial sets must be a config key
        config_from(copy.deepcopy(base), {key: one_value(key, spec.params[key])})
    # a stopped sweep's records are there before anything starts
    path = records_of(resume_run, config) if resume_run else None
    # a local start declares the machine's cores, or one trial's CPUs where that is more:
    # trials run side by side as far as the cores hold them, as on a cluster (two trials
    # oversubscribing two cores take longer together than one after the other)
    cpus = sum(bundle.get("CPU", 0.0) for bundle in trial_bundles(config))
    began = time.monotonic()
    with ThreadPoolExecutor(1, thread_name_prefix="tracking") as background:
        # MLflow's store and Ray's start are both slow, and wait on neither: side by side
        opening = background.submit(open_tracker, config, resume_run)
        try:
            started = connect_ray(
                config.cluster.address, int(cpus + 0.5), code_to_ship(config.cluster)
            )
        except BaseException as error:
            if opening.exception() is None:
                opening.result().__exit__(type(error), error, error.__traceback__)
            raise
    try:
        tracker = opening.result()
        with tracker:
            client = MlflowClient(tracker.tracking_uri)
            if path is None:
                tracker.log_params({f"sweep.{k}": str(v) for k, v in spec.params.items()})
                tracker.log_dict(config.resolved(), "config.yaml")  # what a resume reads
                path = SWEEPS_FOLDER.resolve() / f"sweep-{tracker.run_id}"
                tracker.set_tags({PATH_TAG: str(path)})
            with stop_requests():  # until Tune takes the signals over (fit)
                rows = shared_rows(config)
                tracker.set_tags({ROWS_TAG: rows_note(rows)})
                trainable = make_trainable(config, base, tracker.run_id, rows)
                tuner = make_tuner(config, trainable, tracker.run_id, path)
            try:
                grid, signum = fit(tuner)
            finally:  # trials Tune stopped (its scheduler, a signal) could not say so
                end_left_running(client, tracker.experiment_id, tracker.run_id)
            if signum is None and unfinished(grid):
                signum = signal.SIGINT  # Tune's own Ctrl-C handler took it
            if signum is not None:
                how = resume_command(tracker.run_id, tracker.tracking_uri)
                raise Interrupted(
                    signum,
                    f"{stopped_by(signum)}: the sweep's run {tracker.run_id} and its "
                    f"unfinished trials' runs are KILLED; go on with: {how}",
                )
            trials = [trial_of(result, spec.params, spec.metric) for result in grid]
            for trial in trials:
                if trial.stopped_at is not None and trial.run_id:
                    why = f"the sweep's {spec.scheduler} scheduler, after step {trial.stopped_at}"
                    client.set_tag(trial.run_id, STOPPED_TAG, why)
            best = best_trial(trials, spec.mode)
            tracker.log_text(results_csv(trials, spec.metric), "sweep/results.csv")
            registered = None
            if best is not None:
                tracker.set_tags({BEST_TAG: best.run_id})
                client.set_tag(best.run_id, BEST_TAG, "true")
                if config.tracking.register_model:  # the best trial's model, not every one's
                    registered = register_best(client, best, config, tracker.run_id)
    finally:
        if started:
            import ray

            ray.shutdown()
    seconds = time.monotonic() - began
    return SweepResult(tracker.run_id, tracker.tracking_uri, trials, best, seconds, registered)


def fit(tuner: Any) -> tuple[Any, int | None]:
    """Tune's fit, and the signal that stopped it, where we saw one. Ctrl-C is Ray Tune's
    own: it stops every trial and keeps the sweep's records for a resume. A SIGTERM, or a
    Ctrl-C before Tune took Ctrl-C over, is handed to Tune as its Ctrl-C once it has (Tune has
    no other public way to stop so that it can go on later). Signals after that are only
    noted: Tune's stop is bounded, and an exception raised inside Ray's waits breaks them."""
    asked: list[int] = []
    done = threading.Event()

    def hand_over() -> None:
        while not done.wait(HAND_OVER_SECONDS):
            if signal.getsignal(signal.SIGINT) is not note:  # Tune's handler is in place
                signal.raise_signal(signal.SIGINT)
                return

    def note(signum: int, frame: Any) -> None:
        if not asked:
            threading.Thread(target=hand_over, daemon=True).start()
        asked.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        grid = tuner.fit()
    finally:
        done.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return grid, (asked[0] if asked else None)


def unfinished(grid: Any) -> bool:
    """Whether Tune left trials to go on with: it was stopped before they all ended."""
    from ray.tune import ExperimentAnalysis

    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.ERROR)  # its warning on trials without results yet is ours
    try:
        trials = ExperimentAnalysis(grid.experiment_path).trials
    finally:
        tune_log.setLevel(level)
    return any(trial.status in ("PENDING", "RUNNING", "PAUSED") for trial in trials)


def shared_rows(config: Config) -> Source | None:
    """data.path's rows, read once into Ray's object store for all the trials (a node's
    trials share one copy); None where each trial makes or reads its own: synthetic rows,
    which each worker draws itself, or a sweep of data keys."""
    import ray

    if config.data.path is None or any(key.startswith("data.") for key in config.sweep.params):
        return None
    plan = make_plan(config)
    return plan.source.loaded([*plan.features, plan.label], ray.put)


def rows_note(rows: Source | None) -> str:
    if rows is None:
        return "each trial makes or reads its own rows"
    return f"read once into Ray's object store: {rows.total_rows} rows of {len(rows.files)} file(s)"


def make_trainable(config: Config, base: dict[str, Any], parent: str, rows: Source | None) -> Any:
    """The trial function with what every trial shares, in its placement group."""
    from ray import tune

    trial = tune.with_parameters(
        run_trial,
        base=base,
        parent=parent,
        folder=str(Path.cwd()),
        reports=REPORTS if config.sweep.scheduler == "asha" else 0,
        rows=rows,
    )
    return tune.with_resources(trial, functools.partial(trial_placement, base))


def trial_placement(base: dict[str, Any], values: dict[str, Any]) -> Any:
    """The placement group of the trial of these values (which may set its workers); the
    base config's where the values are invalid, for the trial to fail with its error."""
    from ray import tune

    try:
        config = config_from(copy.deepcopy(base), values)
    except ConfigError:
        config = config_from(copy.deepcopy(base), {})
    return tune.PlacementGroupFactory(trial_bundles(config))


def tune_records(path: Path) -> bool:
    """Whether `path` holds a stopped sweep's records, for Ray Tune to go on with."""
    from ray import tune

    return tune.Tuner.can_restore(str(path))


def records_of(resume_run: str, config: Config) -> Path:
    """Where Ray Tune keeps the records of the sweep of run `resume_run`."""
    client = store_client(config)
    path = Path(client.get_run(resume_run).data.tags.get(PATH_TAG, SWEEPS_FOLDER))
    if not tune_records(path):
        raise ConfigError(
            f"sweep {resume_run}: Ray Tune's records of it are not at {path}; "
            "resume it on the machine and in the folder it ran in"
        )
    return path


def make_tuner(config: Config, trainable: Any, parent: str, path: Path) -> Any:
    """Ray Tune's Tuner of the sweep, kept in `path`: a trial per point of the space; where
    `path` holds a stopped sweep's records, that sweep, to go on with."""
    from ray import tune

    if tune_records(path):
        # errored trials too: a lost node fails a trial that can go on
        return tune.Tuner.restore(str(path), trainable, resume_errored=True)
    spec = config.sweep
    return tune.Tuner(
        trainable,
        param_space=search_space(spec.params),
        tune_config=tune.TuneConfig(
            num_samples=spec.samples,
            max_concurrent_trials=spec.max_concurrent,
            reuse_actors=True,  # a trial process, imports done, goes on to the next trial
            **scheduler(config),
        ),
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0),
    )


def end_left_running(client: Any, experiment_id: str, parent: str) -> None:
    """The sweep's child runs still RUNNING once Tune is done: their trials were stopped
    (by the scheduler, or a signal) in a way the run could not record. KILLED."""
    running = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'",
    )
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")


def register_best(client: Any, best: Trial, config: Config, parent: str) -> str:
    """The best trial's model as a new version of tracking.register_model."""
    run = client.get_run(best.run_id)
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{best.run_id}'"
    )
    if not found:
        raise TrainingError(f"the best trial's run {best.run_id} has logged no model")
    metric = config.sweep.metric
    return register_model(
        client,
        best.run_id,
        found[0].model_id,
        config.tracking.register_model,
        {metric: f"{best.metric:.6g}", "sweep": parent},
        run.data.tags.get("mlflow.note.content", ""),
    )


def scheduler(config: Config) -> dict[str, Any]:
    """TuneConfig's scheduler and what it judges by; nothing for fifo (every trial runs to
    its end, and the sweep ranks them itself)."""
    spec = config.sweep
    if spec.scheduler == "fifo":
        return {}
    from ray.tune.schedulers import ASHAScheduler

    steps = config.train.steps
    every = max(1, steps // REPORTS)
    asha = ASHAScheduler(time_attr=STEP, max_t=steps, grace_period=every * ASHA_GRACE_REPORTS)
    return {"scheduler": asha, "metric": spec.metric, "mode": spec.mode}


def trial_of(result: Any, params: dict[str, Any], metric: str) -> Trial:
    """A Ray Tune result as the sweep's record of one trial."""
    values = {key: result.config.get(key) for key in params}
    metrics = result.metrics or {}
    error = str(result.error).strip().splitlines()[-1] if result.error else None
    value = metrics.get(metric)
    stopped = None if metrics.get(FINISHED) or error or not metrics else metrics.get(STEP)
    return Trial(
        metrics.get("run_id"),
        values,
        None if value is None else float(value),
        error,
        stopped,
        metrics.get("time_total_s"),
    )


def best_trial(trials: list[Trial], mode: str) -> Trial | None:
    # a trial stopped early is not a candidate: its metric is of a shorter run
    ranked = [t for t in trials if t.metric is not None and t.run_id and t.stopped_at is None]
    if not ranked:
        return None
    pick = min if mode == "min" else max
    return pick(ranked, key=lambda trial: trial.metric)


def results_csv(trials: list[Trial], metric: str) -> str:
    """One row a trial: its run, the values it tried, the metric, its time in Ray Tune, and
    its error if any."""
    import pandas as pd

    rows = [
        {"run_id": t.run_id, **t.values, metric: t.metric, "seconds": t.seconds,
         "error": t.error or ""}
        for t in trials
    ]  # fmt: skip
    return pd.DataFrame(rows).to_csv(index=False)
