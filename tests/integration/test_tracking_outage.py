"""The tracking server going away: refused at the start in seconds, ridden out mid-run.

A real `mlflow server` process on loopback, stopped and started again while a run trains.
"""

import signal
import subprocess
import time

import pytest
from mlflow import MlflowClient

from tests.processes import BIN, MlflowServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path / "store")
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


def shardprop(*args, cwd):
    return subprocess.Popen(
        [str(BIN / "shardprop"), *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_unreachable_server_is_refused_in_seconds_before_any_worker(tmp_path):
    started = time.monotonic()
    process = shardprop(
        "train", "/dev/null", "--tracking-uri", f"http://127.0.0.1:{free_port()}", cwd=tmp_path
    )
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "tracking.uri: the MLflow server at http://127.0.0.1" in stderr
    assert "Ray" not in stderr and "Traceback" not in stderr
    assert time.monotonic() - started < 30


def test_a_server_stopped_and_restarted_mid_run_loses_no_metric(tmp_path, server):
    steps = 40
    config = tmp_path / "slow.yaml"
    config.write_text(
        "data: {synthetic: {name: moons, rows: 60000}}\nmodel: {hidden: [128, 128]}\n"
        f"train: {{steps: {steps}, checkpoint_every: 10}}\ncluster: {{workers: 0}}\n"
        # written every 0.2 s, so that the writer surely meets the store down
        "tracking: {flush_seconds: 0.2}\n"
    )
    out = tmp_path / "out"
    run = shardprop("train", config, "--tracking-uri", server.uri, "--output", out, cwd=tmp_path)
    checkpoints = out / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints / "step-000020").exists():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    server.stop()
    while not (checkpoints / "step-000030").exists():  # training goes on without the store
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    # the run holds still while the server starts again (seconds, and never the same), so
    # that it is still mid-run, with its last steps to train, when the store is back
    run.send_signal(signal.SIGSTOP)
    try:
        server.start()
    finally:
        run.send_signal(signal.SIGCONT)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert "unreachable" in stderr  # the user was told, once
    client = MlflowClient(server.uri)
    (finished,) = client.search_runs([client.get_experiment_by_name("shardprop").experiment_id])
    assert finished.info.status == "FINISHED"
    logged = [p.step for p in client.get_metric_history(finished.info.run_id, "loss")]
    assert sorted(logged) == list(range(1, steps + 1))
    uploaded = {a.path for a in client.list_artifacts(finished.info.run_id, "checkpoints")}
    assert "checkpoints/step-000030" in uploaded  # written while the store was down
    assert (out / "weights.npz").exists()
