"""Nothing waits for ever: workers Ray cannot place, hung steps, and signals at any moment
end the run with a bound, a message, the last good weights and the command that goes on."""

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from shardprop.service.cluster.group import RayGroup
from shardprop.service.cluster.policy import FailurePolicy
from shardprop.service.config import load_config
from shardprop.service.errors import TrainingError
from shardprop.service.training.run import make_plan
from tests.groups import kill_and_wait
from tests.processes import start_shardprop as shardprop

CONFIG = """
data: {synthetic: {name: moons, rows: 20000, noise: 0.3, seed: 3}}
model: {hidden: [32, 32]}
train: {steps: 100000, optimizer: adam, learning_rate: 0.01, checkpoint_every: 2}
cluster: {workers: 2}
tracking: {flush_seconds: 0.2}
"""


def wait_for(ready, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{what} never came"
        time.sleep(0.05)


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("shardprop")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def ended(process: subprocess.Popen, seconds: float) -> tuple[int, str]:
    """The exit code and stderr of a process that must end within `seconds`."""
    _, stderr = process.communicate(timeout=seconds)
    return process.returncode, stderr


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.slow
def test_sigterm_during_start_up_exits_143_marks_the_run_killed_and_says_how_to_go_on(
    tmp_path, config, new_store
):
    uri = new_store(tmp_path)  # its schema made: this test's polling never races its set-up
    process = shardprop("train", config, "--tracking-uri", uri, cwd=tmp_path)
    # the run is opened while Ray starts: the signal lands in the start-up
    wait_for(lambda: runs(uri), process, "the run")
    process.send_signal(signal.SIGTERM)
    code, stderr = ended(process, 60)
    assert code == 143, stderr
    (line,) = stderr.strip().splitlines()[-1:]
    assert line.startswith("interrupted: stopped by SIGTERM"), stderr
    (run,) = runs(uri)
    assert f"go on with: shardprop resume {run.info.run_id}" in line
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_a_signal_ends_a_step_that_never_ends_and_keeps_the_last_step_taken(
    tmp_path, config, new_store
):
    uri = new_store(tmp_path)
    out = tmp_path / "out"
    # worker 1 never answers at step 7; no step_timeout: the wait is long, but Ctrl-C ends it
    process = shardprop(
        "train", config, "--tracking-uri", uri, "--output", out,
        "--inject-failure", "worker=1,step=7,when=hang",
        cwd=tmp_path,
    )  # fmt: skip
    wait_for((out / "checkpoints" / "step-000006" / "manifest.json").exists, process, "step 6")
    time.sleep(2)  # in the hung step now
    process.send_signal(signal.SIGINT)
    code, stderr = ended(process, 60)
    assert code == 130, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped by SIGINT after step 6"), stderr
    assert f"{out}/checkpoints/step-000006/weights.npz" in line
    (run,) = runs(uri)
    assert run.info.status == "KILLED"
    assert f"shardprop resume {run.info.run_id}" in line


def test_a_replacement_ray_cannot_place_fails_the_step_within_start_timeout(ray_session):
    config = load_config(None, ["data.synthetic.rows=300"], {"cluster.workers": 2})
    plan = make_plan(config)
    # the two workers take the runtime's 6 CPUs; once one is lost, a stranger takes its 3
    group = RayGroup(
        plan, cpus_per_worker=3, owns_runtime=False, policy=FailurePolicy(1), start_timeout=5
    )
    stranger = ray_session.remote(num_cpus=3)(Stranger).remote()
    try:
        group.call("load", 0.0, 0)
        kill_and_wait(ray_session, group.actors[1])
        ray_session.get(stranger.where.remote(), timeout=60)
        started = time.monotonic()
        with pytest.raises(TrainingError) as failed:
            group.call("where")
        assert time.monotonic() - started < 30
        message = str(failed.value)
        assert "the replacement of worker 1 could not be placed" in message, message
        assert "each needs CPU 3" in message and "cluster.start_timeout" in message
    finally:
        group.close()
        ray_session.kill(stranger)


class Stranger:
    def where(self) -> str:
        return "here"


@pytest.mark.slow
def test_workers_a_joined_cluster_cannot_place_fail_the_run_after_start_timeout(
    ray_session, tmp_path, config, new_store
):
    uri = new_store(tmp_path)
    address = ray_session.get_runtime_context().gcs_address
    process = shardprop(
        "train", config, "--address", address, "--tracking-uri", uri,
        "--set", "cluster.worker_resources={shard_slot: 1}",
        "--set", "cluster.start_timeout=12",
        cwd=tmp_path,
    )  # fmt: skip
    code, stderr = ended(process, 120)
    assert code == 1, stderr
    assert "could not be placed: each needs CPU 1, shard_slot 1" in stderr  # said while waiting
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("failed: worker(s) 0, 1 could not be placed"), stderr
    assert "after waiting 12 s (cluster.start_timeout)" in line
    (run,) = runs(uri)
    assert run.info.status == "FAILED"
    assert f"go on with: shardprop resume {run.info.run_id}" in line


def test_a_loss_that_grows_a_thousandfold_fails_the_run_though_it_stays_finite(tmp_path, new_store):
    from typer.testing import CliRunner

    from shardprop.service.cli.app import app

    uri = new_store(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "train", "/dev/null", "--workers", "0", "--tracking-uri", uri,
            "--set", "data.synthetic={name: moons, rows: 500}",
            "--set", "train.learning_rate=1e6",
            "--set", "train.steps=50",
        ],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert "training diverged at step" in line and "times its best" in line, line
    assert np.isfinite(float(line.split("(loss ")[1].split(",")[0]))
    (run,) = runs(uri)
    assert run.info.status == "FAILED"
