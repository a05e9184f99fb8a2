"""A sweep on a local Ray runtime: each trial a whole training, nested under the sweep's
MLflow run, with the very bits `shardprop train` gives the trial's config (exact)."""

import signal
import time

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from shardprop.service.config import load_config
from shardprop.service.sweep.run import BEST_TAG, STOPPED_TAG, sweep
from shardprop.service.training.run import train
from tests.processes import start_shardprop as shardprop

pytestmark = pytest.mark.slow

SETS = [
    "data.synthetic={name: moons, rows: 801, noise: 0.3, seed: 2}",
    "model.hidden=[8]",
    "train.steps=20",
    "train.optimizer=adam",
    "train.reduction=exact",
    "cluster.workers=2",
    "sweep.params={train.learning_rate: '0.01,0.1'}",
    "sweep.max_concurrent=2",
]


def test_each_trial_is_a_nested_run_with_the_bits_of_train(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri
    config = load_config(None, SETS, {"tracking.uri": uri, "tracking.register_model": "moons"})
    result = sweep(config)

    assert [t.error for t in result.trials] == [None, None]
    client = MlflowClient(uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    children = {t.run_id: t for t in result.trials}
    for run_id, trial in children.items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert run.info.status == "FINISHED"
        assert float(run.data.params["train.learning_rate"]) == trial.values["train.learning_rate"]
    best = min(result.trials, key=lambda t: t.metric)
    assert result.best == best and parent.data.tags[BEST_TAG] == best.run_id
    assert client.get_run(best.run_id).data.tags[BEST_TAG] == "true"
    (version,) = client.search_model_versions("name = 'moons'")  # the best trial's alone
    assert result.registered == "models:/moons/1" and version.run_id == best.run_id

    # the trial of learning rate 0.1 against `train` of that config, in this process
    (trial,) = [t for t in result.trials if t.values["train.learning_rate"] == 0.1]
    alone = [*SETS, "train.learning_rate=0.1"]
    train(load_config(None, alone, {"tracking.enabled": False}), output=tmp_path / "alone")
    got = tmp_path / ".shardprop" / "runs" / trial.run_id / "weights.npz"
    with np.load(got) as got, np.load(tmp_path / "alone" / "weights.npz") as want:
        for name in want.files:
            assert np.array_equal(got[name], want[name]), name


def test_the_command_sweeps_a_grid_and_a_failing_trial_does_not_stop_it(tmp_path, tracking_uri):
    """`shardprop sweep` with --param: one trial's config cannot train (a width of 0 is
    refused when the trial builds it), the other finishes and is the best."""
    uri = tracking_uri
    sweep_run = shardprop(
        "sweep", "--set", SETS[0], "--set", "train.steps=10", "--param", "model.hidden=[4],[0]",
        "--workers", "1", "--max-concurrent", "2", "--tracking-uri", uri, cwd=tmp_path,
    )  # fmt: skip
    stdout, stderr = sweep_run.communicate(timeout=300)
    assert sweep_run.returncode == 0, stderr
    assert "2 trials in" in stdout and "(best)" in stdout, stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("shardprop").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run is not parent]
    assert [child.data.params["model.hidden"] for child in children] == ["[4]"]
    assert children[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags[BEST_TAG] == children[0].info.run_id
    results = client.download_artifacts(parent.info.run_id, "sweep/results.csv", str(tmp_path))
    rows = pd.read_csv(results)
    assert len(rows) == 2 and rows["error"].fillna("").str.contains("model.hidden").sum() == 1


def test_a_key_that_is_not_a_config_key_is_one_line_and_exit_2_before_any_trial(tmp_path):
    bad = shardprop(
        "sweep", "--param", "train.learnig_rate=0.1,1", "--tracking-uri", "sqlite:///x.db",
        cwd=tmp_path,
    )  # fmt: skip
    _, stderr = bad.communicate(timeout=120)
    assert bad.returncode == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: ") and "train.learnig_rate" in line, line


def test_asha_stops_the_trials_that_lag_and_marks_their_runs(tmp_path, monkeypatch, tracking_uri):
    """Two good learning rates run first; the two far too small ones lag at the first rung
    and are stopped there: their runs KILLED and tagged, the best a trial that finished."""
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri
    sets = [
        *SETS[:-2], "train.steps=100", "sweep.scheduler=asha", "sweep.max_concurrent=2",
        "sweep.params={train.learning_rate: '0.05,0.04,0.000001,0.000002'}",
    ]  # fmt: skip
    config = load_config(None, sets, {"tracking.uri": uri, "cluster.workers": 1})
    result = sweep(config)

    client = MlflowClient(uri)
    lagging = [t for t in result.trials if t.values["train.learning_rate"] < 1e-3]
    for trial in lagging:
        assert trial.stopped_at is not None and trial.stopped_at < 100, trial
        run = client.get_run(trial.run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags[STOPPED_TAG].startswith("the sweep's asha scheduler, after step")
    assert result.best is not None and result.best.stopped_at is None
    assert result.best.values["train.learning_rate"] >= 0.04
    assert client.get_run(result.best.run_id).info.status == "FINISHED"


def test_ctrl_c_stops_every_trial_and_marks_the_sweep_and_its_trials_killed(tmp_path, tracking_uri):
    uri = tracking_uri
    sweep_run = shardprop(
        "sweep", "--set", SETS[0], "--set", "train.steps=100000", "--param",
        "train.learning_rate=0.01,0.02,0.03", "--workers", "1", "--max-concurrent", "2",
        "--tracking-uri", uri, cwd=tmp_path,
    )  # fmt: skip
    client = MlflowClient(uri)

    def trials_running() -> bool:
        assert sweep_run.poll() is None, sweep_run.communicate()
        try:
            runs = client.search_runs(["1"], "attributes.status = 'RUNNING'")
        except Exception:  # the experiment is not made yet
            return False
        return sum("mlflow.parentRunId" in run.data.tags for run in runs) == 2

    deadline = time.monotonic() + 180
    while not trials_running():
        assert time.monotonic() < deadline, "the two trials did not start"
        time.sleep(0.5)
    sweep_run.send_signal(signal.SIGINT)
    _, stderr = sweep_run.communicate(timeout=120)
    assert sweep_run.returncode == 130, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped by SIGINT: the sweep's run"), line
    runs = client.search_runs(["1"])
    assert len(runs) == 3 and {run.info.status for run in runs} == {"KILLED"}, runs
