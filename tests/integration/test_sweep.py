"""A sweep on a local Ray runtime: each trial a whole training, nested under the sweep's
MLflow run, with the very bits `shardprop train` gives the trial's config (exact)."""

import json
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from shardprop.service.config import load_config
from shardprop.service.data.plan import write_table
from shardprop.service.sweep.run import BEST_TAG, PATH_TAG, ROWS_TAG, STOPPED_TAG, sweep
from shardprop.service.training.run import make_plan, train
from shardprop.workers.data.synthetic import SyntheticSpec, generate
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


def moons_file(folder: Path) -> str:
    """SETS[0]'s rows as a Parquet file."""
    rows = generate(SyntheticSpec("moons", 801, noise=0.3, seed=2), 0, 801)
    return str(write_table(rows, folder / "moons.parquet", row_group_rows=100))


def test_each_trial_is_a_nested_run_with_the_bits_of_train(
    tmp_path, monkeypatch, tracking_uri, ray_session
):
    """Rows from a Parquet file, read once by the sweep; two trials run side by side where
    the cluster holds both, and the third in the process and on the workers one of them
    leaves; each is nested, the best is tagged and its model alone registered, and the
    third has the bits of `train` (exact)."""
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri
    rates = "sweep.params={train.learning_rate: '0.01,0.1,0.05'}"
    sets = [f"data.path={moons_file(tmp_path)}", *SETS[1:-2], rates, SETS[-1]]
    config = load_config(None, sets, {"tracking.uri": uri, "tracking.register_model": "moons"})
    result = sweep(config)  # on the 6 CPUs of ray_session: two trials (3 CPUs each) at once

    assert [t.error for t in result.trials] == [None, None, None]
    client = MlflowClient(uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[ROWS_TAG].startswith("read once into Ray's object store: 801 rows")
    children = {t.run_id: t for t in result.trials}
    for run_id, trial in children.items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert run.info.status == "FINISHED"
        assert float(run.data.params["train.learning_rate"]) == trial.values["train.learning_rate"]
    first, second, third = (client.get_run(run_id).info for run_id in children)
    assert first.start_time < second.end_time and second.start_time < first.end_time  # packed
    pids = {run_id: worker_pids(client, run_id) for run_id in children}
    assert pids[third.run_id] in (pids[first.run_id], pids[second.run_id])  # kept workers
    assert pids[first.run_id] != pids[second.run_id]
    best = min(result.trials, key=lambda t: t.metric)
    assert result.best == best and parent.data.tags[BEST_TAG] == best.run_id
    assert client.get_run(best.run_id).data.tags[BEST_TAG] == "true"
    (version,) = client.search_model_versions("name = 'moons'")  # the best trial's alone
    assert result.registered == "models:/moons/1" and version.run_id == best.run_id

    # the third trial, on renewed workers, against `train` of its config, in this process
    (trial,) = [t for t in result.trials if t.values["train.learning_rate"] == 0.05]
    alone = [*sets, "train.learning_rate=0.05"]
    train(load_config(None, alone, {"tracking.enabled": False}), output=tmp_path / "alone")
    same_weights(tmp_path / ".shardprop" / "runs" / trial.run_id, tmp_path / "alone")


def worker_pids(client: MlflowClient, run_id: str) -> list[int]:
    """The processes of a run's workers, rank by rank, from its lineage (shards.json)."""
    shards = Path(client.download_artifacts(run_id, "shards.json")).read_text()
    return [shard["pid"] for shard in json.loads(shards)["shards"]]


def same_weights(got: Path, want: Path) -> None:
    with np.load(got / "weights.npz") as got, np.load(want / "weights.npz") as want:
        for name in want.files:
            assert np.array_equal(got[name], want[name]), name


def test_rows_read_once_train_the_workers_without_their_files(tmp_path, ray_session):
    """What a sweep hands its trials: the file's rows in Ray's object store. Two Ray workers
    train on them with the file gone, to the bits of a run that read the file."""
    path = moons_file(tmp_path)
    config = load_config(None, [f"data.path={path}", *SETS[1:-2]], {"tracking.enabled": False})
    from_file = train(config, output=tmp_path / "from-file")
    plan = make_plan(config)
    rows = plan.source.loaded([*plan.features, plan.label], ray_session.put)
    Path(path).unlink()
    from_store = train(config, output=tmp_path / "from-store", source=rows)
    assert from_store.weights_sha256 == from_file.weights_sha256
    same_weights(tmp_path / "from-store", tmp_path / "from-file")


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


def test_ctrl_c_stops_the_sweep_and_resume_goes_on_to_the_bits_of_train(tmp_path, tracking_uri):
    """Ctrl-C in the middle of a `--quiet` sweep: nothing on stdout; the sweep's run and the
    unfinished trials' runs are KILLED, and the last line says how to go on. `shardprop
    resume` of the sweep's run goes on with the same child runs from their checkpoints (and
    starts the trial that had not started): all FINISHED, each with the bits of `train` of
    its config."""
    uri = tracking_uri
    sets = [SETS[0], "train.steps=400", "train.checkpoint_every=20", "tracking.flush_seconds=0.5"]
    sweep_run = shardprop(
        "sweep", *(arg for item in sets for arg in ("--set", item)),
        "--param", "train.learning_rate=0.01,0.02,0.03", "--workers", "1",
        "--max-concurrent", "2", "--tracking-uri", uri, "--quiet", cwd=tmp_path,
    )  # fmt: skip
    client = MlflowClient(uri)

    def checkpointed_trials() -> int:
        assert sweep_run.poll() is None, sweep_run.communicate()
        try:
            runs = client.search_runs(["1"], "attributes.status = 'RUNNING'")
        except Exception:  # the experiment is not made yet
            return 0
        return sum(
            "mlflow.parentRunId" in run.data.tags and run.data.metrics.get("loss") is not None
            and bool(client.get_metric_history(run.info.run_id, "loss")[-1].step >= 40)
            for run in runs
        )  # fmt: skip

    deadline = time.monotonic() + 180
    while checkpointed_trials() < 1:  # on two cores, one trial at a time
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(0.2)
    sweep_run.send_signal(signal.SIGINT)
    stdout, stderr = sweep_run.communicate(timeout=120)
    assert sweep_run.returncode == 130, stderr
    assert stdout == "", stdout  # --quiet: not even Ray Tune's experiment box
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped by SIGINT: the sweep's run"), line
    assert "go on with: shardprop resume" in line, line
    stopped = {run.info.run_id: run.info.status for run in client.search_runs(["1"])}
    assert len(stopped) >= 2 and "KILLED" in set(stopped.values()), stopped  # parent, trial(s)
    assert set(stopped.values()) <= {"KILLED", "FINISHED"}, stopped

    (parent,) = [
        run for run in client.search_runs(["1"]) if "mlflow.parentRunId" not in run.data.tags
    ]
    resumed = shardprop("resume", parent.info.run_id, "--tracking-uri", uri, cwd=tmp_path)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "3 trials in" in stdout, stdout
    runs = {run.info.run_id: run for run in client.search_runs(["1"])}
    assert set(stopped) <= set(runs) and len(runs) == 4, runs  # the third trial's run is new
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    for run_id, status in stopped.items():
        if status == "KILLED" and run_id != parent.info.run_id:  # went on from a checkpoint
            rate = runs[run_id].data.params["train.learning_rate"]
            alone = [*sets, "cluster.workers=1", f"train.learning_rate={rate}"]
            folder = tmp_path / f"alone-{rate}"
            train(load_config(None, alone, {"tracking.enabled": False}), output=folder)
            same_weights(tmp_path / ".shardprop" / "runs" / run_id, folder)


def test_resuming_a_sweep_whose_tune_records_are_gone_is_one_line_and_exit_2(
    tmp_path, tracking_uri
):
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("gone"))
    config = load_config(None, SETS, {}).resolved()
    client.log_text(run.info.run_id, yaml.safe_dump(config), "config.yaml")
    client.set_tag(run.info.run_id, PATH_TAG, str(tmp_path / "gone"))
    client.set_terminated(run.info.run_id, "KILLED")
    resumed = shardprop("resume", run.info.run_id, "--tracking-uri", tracking_uri, cwd=tmp_path)
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"error: sweep {run.info.run_id}: Ray Tune's records"), line
