"""A sweep: one shardprop training per trial, run side by side by Ray Tune, each a child of
the sweep's MLflow run.

Each trial is the whole `shardprop train` of the base config with the trial's values set
(so its weights are those `shardprop train` gives that config, to the bit under `exact`).
Its coordinator and its workers are reserved together, as one placement group, so trials
pack the cluster side by side; a trial that fails leaves the others running.
"""

import copy
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardprop.service.cluster.capacity import worker_request
from shardprop.service.cluster.runtime import code_to_ship, connect_ray
from shardprop.service.config import Config, config_from
from shardprop.service.errors import ConfigError, TrainingError
from shardprop.service.sweep.space import one_value, search_space
from shardprop.service.tracking.tracker import register_model
from shardprop.service.training.interrupts import Interrupted, StopRequests, stop_requests
from shardprop.service.training.progress import Reporter
from shardprop.service.training.run import open_tracker

SWEEPS_FOLDER = Path(".shardprop") / "sweeps"  # Ray Tune's records of each sweep
BEST_TAG = "shardprop.best_trial"  # on the best child run, and its run id on the parent
COORDINATOR = {"CPU": 1.0}  # a trial's own process, the first bundle of its group
REPORTS = 20  # times a trial reports its metrics to an early-stopping scheduler
ASHA_GRACE_REPORTS = 2  # reports every trial makes before asha may stop it
STEP, FINISHED = "step", "finished"  # in a trial's reports: its step, and that it ran to the end
STOPPED_TAG = "shardprop.stopped"  # why a run ended early


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
    values: dict[str, Any], base: dict[str, Any], parent: str, folder: str, reports: int
) -> None:
    """One trial, in Ray Tune's trial process: `shardprop train` of the base config with these
    values, nested under the sweep's run. Its final metrics go back to Tune, and with
    `reports`, its metrics that many times along the way, for a scheduler to judge."""
    from ray import tune

    from shardprop.service.training.run import train

    os.chdir(folder)  # relative paths (data, the store, outputs) as the sweep sees them
    config = config_from(copy.deepcopy(base), {**values, "tracking.parent_run": parent})
    every = max(1, config.train.steps // reports) if reports else 0
    reporter = TrialReporter(every, config.train.steps)
    result = train(config, reporter=reporter)
    steps = max((step for taken in result.steps.values() for step in taken), default=0)
    tune.report({**result.final, STEP: steps, "run_id": result.run_id, FINISHED: True})


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


def sweep(config: Config) -> SweepResult:
    """Run the sweep `config.sweep` describes over the rest of `config`; the parent run holds
    the sweep's config, the results table and the best trial's id."""
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
    concurrent = spec.max_concurrent or 1
    cpus = concurrent * sum(bundle.get("CPU", 0.0) for bundle in trial_bundles(config))
    started = connect_ray(config.cluster.address, int(cpus + 0.5), code_to_ship(config.cluster))
    began = time.monotonic()
    tracker = open_tracker(config)
    try:
        with tracker:
            tracker.log_params({f"sweep.{key}": str(value) for key, value in spec.params.items()})
            tracker.log_dict(config.resolved(), "sweep/config.yaml")
            client = MlflowClient(tracker.tracking_uri)
            # Ray Tune's own Ctrl-C handling off: a first SIGINT or SIGTERM asks Tune's
            # stopper to end every trial, and is raised once Tune is done; a second at once
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            try:
                with stop_requests() as stop:
                    tuner = make_tuner(config, base, tracker.run_id, stop)
                    with stop.deferred():
                        grid = tuner.fit()
            except Interrupted as error:
                what = f"{error}: the sweep's run {tracker.run_id} and its trials' runs are KILLED"
                raise Interrupted(error.signum, what) from None
            finally:  # trials Tune stopped (its scheduler, a signal) could not say so
                end_left_running(client, tracker.experiment_id, tracker.run_id)
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


def make_tuner(config: Config, base: dict[str, Any], parent: str, stop: StopRequests) -> Any:
    """Ray Tune's Tuner of the sweep: a trial per point of the space, in its placement group;
    every trial stopped once a signal asked the sweep to `stop`."""
    from ray import tune

    class Asked(tune.Stopper):
        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return stop.signum is not None

    spec = config.sweep
    trial = tune.with_parameters(
        run_trial,
        base=base,
        parent=parent,
        folder=str(Path.cwd()),
        reports=REPORTS if spec.scheduler == "asha" else 0,
    )
    return tune.Tuner(
        tune.with_resources(trial, tune.PlacementGroupFactory(trial_bundles(config))),
        param_space=search_space(spec.params),
        tune_config=tune.TuneConfig(
            num_samples=spec.samples,
            max_concurrent_trials=spec.max_concurrent,
            **scheduler(config),
        ),
        run_config=tune.RunConfig(
            name=f"sweep-{parent}",
            storage_path=str(SWEEPS_FOLDER.resolve()),
            stop=Asked(),
            verbose=0,
        ),
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
