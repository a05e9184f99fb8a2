"""A run is held by one live process: its lease, its takeover, the runs left behind.

Real sqlite stores; a holder is a real process (killed with SIGKILL where the test says so).
A holder on another host is a lease written into the store as that host's process would.
"""

import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.tracking import tracker as tracker_module
from shardprop.service.tracking.lease import LEASE_TAG, Lease
from shardprop.service.tracking.tracker import (
    RunFinishedError,
    RunHeldError,
    Tracker,
    recall_run,
)
from tests.processes import BIN, free_port

HOLDER = """
import sys, time
from shardprop.service.tracking.tracker import Tracker
tracker = Tracker.start(sys.argv[1], "owned", "held")
tracker.log_config({"train": {"steps": 3}}, {})
print(tracker.run_id, flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tracking_uri):
    """A process that trains (holds) a run of the store, until the test kills it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, tracking_uri], stdout=subprocess.PIPE, text=True
    )
    process.run_id = process.stdout.readline().strip()
    yield process
    process.kill()
    process.wait()


def write_lease(uri: str, run_id: str, lease: Lease, seconds_left: float) -> None:
    """The lease as its process would have written it, running for `seconds_left` more."""
    until = replace(lease, until=time.time() + seconds_left)
    MlflowClient(uri).set_tag(run_id, LEASE_TAG, until.tag())


ELSEWHERE = Lease(4242, "another-host", 0.0, "pid:[4026531836]")


def resume(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["resume", *map(str, args)])
    return result.exit_code, result.output.strip()


def running_run(uri: str, experiment: str = "owned") -> str:
    """A RUNNING run whose process is gone, as a killed coordinator leaves it."""
    tracker = Tracker.start(uri, experiment, None)
    tracker.end("KILLED")
    client = MlflowClient(uri)
    client.update_run(tracker.run_id, status="RUNNING")
    return tracker.run_id


def test_a_run_held_by_a_live_process_is_refused_and_taken_over_once_it_is_killed(
    tracking_uri, holder
):
    with pytest.raises(RunHeldError, match=rf"run {holder.run_id} is being trained by process "):
        Tracker.reopen(tracking_uri, holder.run_id)
    with pytest.raises(RunHeldError, match=rf"process {holder.pid} on "):
        recall_run(tracking_uri, holder.run_id)  # the CLI's check, before Ray starts
    code, said = resume(holder.run_id, "--tracking-uri", tracking_uri)
    assert (code, said.splitlines()[-1]) == (2, said)
    assert said.startswith(f"error: run {holder.run_id} is being trained by process {holder.pid}")
    assert MlflowClient(tracking_uri).get_run(holder.run_id).info.status == "RUNNING"

    holder.send_signal(signal.SIGKILL)  # no end(), no release: its lease still runs
    holder.wait()
    recalled = recall_run(tracking_uri, holder.run_id)
    assert (recalled.status, recalled.holder) == (
        "RUNNING",
        f"process {holder.pid} on {Lease.ours().host}",
    )
    with Tracker.reopen(tracking_uri, holder.run_id) as tracker:  # at once: its pid is gone
        lease = Lease.from_tags(MlflowClient(tracking_uri).get_run(tracker.run_id).data.tags)
        assert lease is not None and lease.pid == Lease.ours().pid and lease.alive()
    finished = MlflowClient(tracking_uri).get_run(holder.run_id)
    assert finished.info.status == "FINISHED"
    assert Lease.from_tags(finished.data.tags).until == 0  # let go at the end


@pytest.mark.parametrize(
    "seconds_left, held", [(-1.0, False), (30.0, True)], ids=["lapsed", "running"]
)
def test_a_lease_from_another_host_holds_the_run_until_it_lapses(tracking_uri, seconds_left, held):
    run_id = running_run(tracking_uri)
    write_lease(tracking_uri, run_id, ELSEWHERE, seconds_left)
    if held:
        with pytest.raises(RunHeldError, match=r"by process 4242 on another-host"):
            Tracker.reopen(tracking_uri, run_id)
        return
    with Tracker.reopen(tracking_uri, run_id):
        pass
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"


def test_a_finished_run_is_nothing_to_resume_and_is_left_as_it_was(tracking_uri):
    with Tracker.start(tracking_uri, "owned", None) as tracker:
        tracker.log_config({"train": {"steps": 3}}, {})
    before = MlflowClient(tracking_uri).get_run(tracker.run_id)

    recalled = recall_run(tracking_uri, tracker.run_id)
    assert recalled.status == "FINISHED"
    assert recalled.config == {"train": {"steps": 3}}
    with pytest.raises(RunFinishedError, match=rf"run {tracker.run_id} is FINISHED: nothing to"):
        Tracker.reopen(tracking_uri, tracker.run_id)
    after = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert after.data.tags == before.data.tags


def test_resume_of_a_finished_run_says_so_and_exits_0_without_touching_it(tracking_uri):
    with Tracker.start(tracking_uri, "owned", None) as tracker:
        tracker.log_config({"train": {"steps": 3}}, {})
    before = MlflowClient(tracking_uri).get_run(tracker.run_id)
    code, said = resume(tracker.run_id, "--tracking-uri", tracking_uri)
    assert (code, said) == (0, f"run {tracker.run_id} is FINISHED: nothing to resume")
    after = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert (after.info.end_time, after.data.tags) == (before.info.end_time, before.data.tags)


def test_resume_from_a_store_that_is_not_there_is_one_line_and_creates_none(tmp_path):
    server = f"http://127.0.0.1:{free_port()}"
    code, said = resume("0123456789abcdef", "--tracking-uri", server)
    assert code == 2
    assert said.startswith(f"error: tracking.uri: the MLflow server at {server} is unreachable")
    db = tmp_path / "mlflow.db"
    code, said = resume("0123456789abcdef", "--tracking-uri", f"sqlite:///{db}")
    assert (code, said.splitlines()[0]) == (2, said)
    assert f"no tracking store at {db}" in said
    assert not db.exists()


def test_the_next_start_marks_runs_whose_process_is_gone_failed(tracking_uri):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid on this host with nobody behind it
    killed_here = running_run(tracking_uri)
    write_lease(tracking_uri, killed_here, replace(Lease.ours(), pid=gone.pid), 30.0)
    lost_elsewhere = running_run(tracking_uri)
    write_lease(tracking_uri, lost_elsewhere, ELSEWHERE, -1.0)
    alive_elsewhere = running_run(tracking_uri)
    write_lease(tracking_uri, alive_elsewhere, ELSEWHERE, 30.0)
    older_version = (
        MlflowClient(tracking_uri)
        .create_run(MlflowClient(tracking_uri).get_experiment_by_name("owned").experiment_id)
        .info.run_id
    )  # RUNNING, without a lease
    other_experiment = running_run(tracking_uri, "elsewhere")
    write_lease(tracking_uri, other_experiment, ELSEWHERE, -1.0)

    with Tracker.start(tracking_uri, "owned", None):
        pass

    client = MlflowClient(tracking_uri)
    for run_id in (killed_here, lost_elsewhere):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert "stopped renewing its lease" in run.data.tags["error"]
        assert (
            f"shardprop resume {run_id} --tracking-uri '{tracking_uri}'" in run.data.tags["error"]
        )
    for run_id in (alive_elsewhere, older_version, other_experiment):
        assert client.get_run(run_id).info.status == "RUNNING"

    with Tracker.reopen(tracking_uri, killed_here):  # a FAILED run goes on as before
        pass
    resumed = client.get_run(killed_here)
    assert resumed.info.status == "FINISHED"
    assert "error" not in resumed.data.tags  # why it had stopped is no longer true of it


def test_the_writer_renews_the_lease_on_its_own_beat(tracking_uri, monkeypatch):
    monkeypatch.setattr(tracker_module, "RENEW_SECONDS", 0.2)
    client = MlflowClient(tracking_uri)
    # metrics written only at the end: the renewals do not wait for them
    with Tracker.start(tracking_uri, "owned", None, flush_seconds=600) as tracker:
        first = Lease.from_tags(client.get_run(tracker.run_id).data.tags).until
        deadline = time.monotonic() + 10
        while Lease.from_tags(client.get_run(tracker.run_id).data.tags).until <= first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.1)
    assert Lease.from_tags(client.get_run(tracker.run_id).data.tags).until == 0


@pytest.mark.slow
def test_three_first_starts_together_on_a_new_sqlite_store_all_finish(tmp_path):
    """MLflow creates a new database's tables in its first client: three at once used to
    break each other's schema (duplicate column, a leftover _alembic_tmp_ table)."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    config = tmp_path / "run.yaml"
    config.write_text("data: {synthetic: {name: moons, rows: 2000}}\nmodel: {hidden: [8]}\n")
    runs = [
        subprocess.Popen(
            [
                str(BIN / "shardprop"),
                "train",
                str(config),
                "--set",
                "train.steps=20",
                "--workers",
                "0",
                "--tracking-uri",
                uri,
                "--output",
                str(tmp_path / f"out{n}"),
                "--quiet",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shardprop").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * 3
