"""A sweep: one shardprop training per trial, run side by side by Ray Tune, each a child of
the sweep's MLflow run.

Each trial is the whole `shardprop train` of the base config with the trial's values set
(so its weights are those `shardprop train` gives that config, to the bit under `exact`).
Its coordinator and its workers are reserved together, as one placement group, so trials
pack the cluster side by side; a trial that fails leaves the others running.
"""

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardprop.service.cluster.capacity import worker_request
from shardprop.service.cluster.runtime import code_to_ship, connect_ray
from shardprop.service.config import Config, config_from
from shardprop.service.errors import ConfigError
from shardprop.service.sweep.space import one_value, search_space
from shardprop.service.training.run import open_tracker

SWEEPS_FOLDER = Path(".shardprop") / "sweeps"  # Ray Tune's records of each sweep
BEST_TAG = "shardprop.best_trial"  # on the best child run, and its run id on the parent
COORDINATOR = {"CPU": 1.0}  # a trial's own process, the first bundle of its group


@dataclass
class Trial:
    run_id: str | None  # its MLflow run, None where it failed before opening one
    values: dict[str, Any]  # the config keys it set
    metric: float | None  # the sweep's metric at the end of the run
    error: str | None = None


@dataclass
class SweepResult:
    run_id: str  # the parent MLflow run
    tracking_uri: str
    trials: list[Trial]
    best: Trial | None
    seconds: float


def run_trial(values: dict[str, Any], base: dict[str, Any], parent: str, folder: str) -> None:
    """One trial, in Ray Tune's trial process: `shardprop train` of the base config with these
    values, nested under the sweep's run; its final metrics go back to Tune."""
    from ray import tune

    from shardprop.service.training.progress import Reporter
    from shardprop.service.training.run import train

    os.chdir(folder)  # relative paths (data, the store, outputs) as the sweep sees them
    config = config_from(copy.deepcopy(base), {**values, "tracking.parent_run": parent})
    result = train(config, reporter=Reporter("quiet"))
    tune.report({**result.final, "run_id": result.run_id})


def trial_bundles(config: Config) -> list[dict[str, float]]:
    """A trial's placement group: its coordinator, then each of its workers."""
    workers = config.cluster.workers
    return [COORDINATOR, *[worker_request(config.cluster)] * workers]


def sweep(config: Config, base: dict[str, Any]) -> SweepResult:
    """Run the sweep `config.sweep` describes over `base` (the config as a mapping); the
    parent run holds the sweep's config, the results table and the best trial's id."""
    from mlflow import MlflowClient
    from ray import tune

    spec = config.sweep
    if not spec.params:
        raise ConfigError("sweep.params: nothing to try; give --param key=values")
    if not config.tracking.enabled:
        raise ConfigError("tracking.enabled: a sweep's trials are MLflow runs; drop --no-tracking")
    space = search_space(spec.params)
    for key in spec.params:  # every key a trial sets must be a config key
        config_from(copy.deepcopy(base), {key: one_value(key, spec.params[key])})
    bundles = trial_bundles(config)
    concurrent = spec.max_concurrent or 1
    cpus = concurrent * sum(bundle.get("CPU", 0.0) for bundle in bundles)
    started = connect_ray(config.cluster.address, int(cpus + 0.5), code_to_ship(config.cluster))
    began = time.monotonic()
    tracker = open_tracker(config)
    try:
        with tracker:
            tracker.log_params({f"sweep.{key}": str(value) for key, value in spec.params.items()})
            tracker.log_dict(config.resolved(), "sweep/config.yaml")
            tuner = tune.Tuner(
                tune.with_resources(
                    tune.with_parameters(
                        run_trial, base=base, parent=tracker.run_id, folder=str(Path.cwd())
                    ),
                    tune.PlacementGroupFactory(bundles),
                ),
                param_space=space,
                tune_config=tune.TuneConfig(
                    num_samples=spec.samples, max_concurrent_trials=spec.max_concurrent
                ),
                run_config=tune.RunConfig(
                    name=f"sweep-{tracker.run_id}",
                    storage_path=str((SWEEPS_FOLDER).resolve()),
                    verbose=0,
                ),
            )
            grid = tuner.fit()
            trials = [trial_of(result, spec.params, spec.metric) for result in grid]
            best = best_trial(trials, spec.mode)
            tracker.log_text(results_csv(trials, spec.metric), "sweep/results.csv")
            if best is not None:
                tracker.set_tags({BEST_TAG: best.run_id})
                MlflowClient(tracker.tracking_uri).set_tag(best.run_id, BEST_TAG, "true")
    finally:
        if started:
            import ray

            ray.shutdown()
    seconds = time.monotonic() - began
    return SweepResult(tracker.run_id, tracker.tracking_uri, trials, best, seconds)


def trial_of(result: Any, params: dict[str, Any], metric: str) -> Trial:
    """A Ray Tune result as the sweep's record of one trial."""
    values = {key: result.config.get(key) for key in params}
    metrics = result.metrics or {}
    error = str(result.error).strip().splitlines()[-1] if result.error else None
    value = metrics.get(metric)
    return Trial(metrics.get("run_id"), values, None if value is None else float(value), error)


def best_trial(trials: list[Trial], mode: str) -> Trial | None:
    ranked = [trial for trial in trials if trial.metric is not None and trial.run_id]
    if not ranked:
        return None
    pick = min if mode == "min" else max
    return pick(ranked, key=lambda trial: trial.metric)


def results_csv(trials: list[Trial], metric: str) -> str:
    """One row a trial: its run, the values it tried, the metric, and its error if any."""
    import pandas as pd

    rows = [
        {"run_id": t.run_id, **t.values, metric: t.metric, "error": t.error or ""} for t in trials
    ]
    return pd.DataFrame(rows).to_csv(index=False)
