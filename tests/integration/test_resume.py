"""Stopped runs go on to the same weights: a killed coordinator, Ctrl-C, a corrupt checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from shardprop.service.config import load_config
from shardprop.service.training.checkpoint import latest_checkpoint, save_checkpoint
from shardprop.service.training.run import train
from shardprop.workers.network.params import Layout
from tests.processes import start_shardprop as shardprop

CONFIG = """
data: {synthetic: {name: moons, rows: 40000, noise: 0.3, seed: 3}}
model: {hidden: [64, 64]}
train: {steps: 120, optimizer: adam, learning_rate: 0.01, checkpoint_every: 10}
cluster: {workers: 2}
tracking: {flush_seconds: 0.2}
"""


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def wait_for_upload(uri: str, process: subprocess.Popen, seconds: float = 60) -> None:
    """Until checkpoints/fingerprints.json is in the run: written after a checkpoint's upload."""
    client = MlflowClient(uri)
    deadline = time.monotonic() + seconds
    while True:
        experiment = client.get_experiment_by_name("shardprop")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and any(
            item.path == "checkpoints/fingerprints.json"
            for item in client.list_artifacts(runs[0].info.run_id, "checkpoints")
        ):
            return
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint was uploaded"
        time.sleep(0.05)


@pytest.fixture(params=["adam"])
def config(tmp_path, request):
    """The run's YAML; with `lbfgs`, the same run on L-BFGS (its history is resumed too)."""
    path = tmp_path / "run.yaml"
    text = CONFIG
    if request.param == "lbfgs":
        text = text.replace("optimizer: adam, learning_rate: 0.01", "optimizer: lbfgs")
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """uninterrupted(config) -> (its weights.npz, the steps it took): the run of the config
    that was never stopped, in process (the same bits as on any number of workers), made
    once per config for the tests that stop and resume that config."""
    made: dict[str, tuple[Path, int]] = {}

    def reference(config: Path) -> tuple[Path, int]:
        text = config.read_text()
        if text not in made:
            output = tmp_path_factory.mktemp("uninterrupted")
            flags = {"cluster.workers": 0, "tracking.enabled": False}
            result = train(load_config(config, [], flags), output=output)
            made[text] = output / "weights.npz", len(result.history["loss"])
        return made[text]

    return reference


def only_run(uri):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("shardprop").experiment_id])
    return client, run


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, from_mlflow, own_runtime",
    [("adam", False, True), ("adam", True, False), ("lbfgs", False, False)],
    ids=["local", "from-mlflow", "lbfgs"],
    indirect=["config"],
)
def test_a_killed_coordinator_resumes_the_same_run_to_the_same_bits(
    new_store, tmp_path, config, from_mlflow, own_runtime, uninterrupted, request
):
    reference, last = uninterrupted(config)
    # adam takes every step; lbfgs stops by itself on a plateau, which the resume must find too
    assert last > 30

    # one case starts a Ray runtime of its own, as a plain `train` does; the others join the
    # session's, rather than start one for the killed run and one more for its resume
    joined = []
    if not own_runtime:
        ray_session = request.getfixturevalue("ray_session")
        joined = ["--address", ray_session.get_runtime_context().gcs_address]
    uri = new_store(tmp_path)
    out = tmp_path / "out"
    victim = shardprop(
        "train", config, *joined, "--tracking-uri", uri, "--output", out, cwd=tmp_path
    )
    wait_for(out / "checkpoints" / "step-000030" / "manifest.json", victim)
    if from_mlflow:  # and for the writer to have uploaded one
        wait_for_upload(uri, victim)
    victim.send_signal(signal.SIGKILL)  # as an operator's kill -9, or a lost node
    _, stderr = victim.communicate(timeout=60)  # to the watchdog's last line
    assert stderr.strip().splitlines()[-1].startswith("failed: the run ended without a word")
    assert "go on with: shardprop resume" in stderr
    client, run = only_run(uri)
    assert run.info.status == "FAILED"  # marked by the watchdog

    if from_mlflow:  # as on another machine: only the run's uploaded checkpoints are left
        shutil.rmtree(out)
    resumed = shardprop("resume", run.info.run_id, "--tracking-uri", uri, *joined, cwd=tmp_path)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    if from_mlflow:
        assert list((out / "fetched" / "checkpoints").glob("step-*")), "nothing was fetched"
    with np.load(out / "weights.npz") as got, np.load(reference) as want:
        for name in want.files:
            assert np.array_equal(got[name], want[name]), name
    client, run = only_run(uri)
    assert run.info.status == "FINISHED"
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, last + 1))  # every step once, none twice
    if from_mlflow:  # the fingerprints of the killed process's uploads, then the resume's
        path = client.download_artifacts(run.info.run_id, "checkpoints/fingerprints.json", tmp_path)
        fingerprints = json.loads(Path(path).read_text())
        assert list(fingerprints) == [f"step-{step:06d}" for step in range(10, last + 1, 10)]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_checkpoints_marks_the_run_killed_and_leaves_no_actors(
    new_store, ray_session, tmp_path, config, signum, code
):
    from ray.util.state import list_actors

    address = ray_session.get_runtime_context().gcs_address
    uri = new_store(tmp_path)
    out = tmp_path / "out"
    process = shardprop(
        "train", config, "--address", address, "--tracking-uri", uri, "--output", out, cwd=tmp_path
    )
    wait_for(out / "checkpoints" / "step-000010" / "manifest.json", process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    name = signal.Signals(signum).name
    assert f"interrupted: stopped by {name} after step" in stderr
    assert "shardprop resume" in stderr
    stopped_at = int(stderr.split(" after step ")[1].split()[0].rstrip(";"))
    assert (out / "checkpoints" / f"step-{stopped_at:06d}" / "manifest.json").exists()
    _, run = only_run(uri)
    assert run.info.status == "KILLED"
    alive = [
        actor
        for actor in list_actors(
            address=ray_session.dashboard_address, filters=[("state", "=", "ALIVE")]
        )
        if actor.class_name == "ShardWorker"
    ]
    assert alive == []


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    layout = Layout((2, 3, 1))
    for step in (10, 20):
        save_checkpoint(
            tmp_path,
            step,
            layout,
            np.full(layout.size, float(step)),
            {"optimizer.m": np.arange(3.0)},
        )
    weights = tmp_path / "step-000020" / "weights.npz"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    checkpoint = latest_checkpoint(tmp_path, layout, "float64")
    assert checkpoint.step == 10
    assert np.all(checkpoint.theta == 10.0)
    assert np.array_equal(checkpoint.part("optimizer")["m"], np.arange(3.0))
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    layout = Layout((2, 1))
    theta = np.zeros(layout.size)
    theta[0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(tmp_path, 1, layout, theta, {})
    assert latest_checkpoint(tmp_path, layout, "float64") is None
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_carries_every_logged_metric_for_the_store_to_catch_up():
    from shardprop.service.training.run import records_from_arrays, records_to_arrays

    records = [(1, {"loss": 0.9}), (2, {"loss": 0.8, "val_loss": 0.85}), (3, {"loss": 0.7})]
    assert records_from_arrays(records_to_arrays(records)) == records
    assert records_from_arrays(records_to_arrays([])) == []
