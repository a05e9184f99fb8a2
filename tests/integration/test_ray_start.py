"""Starting a run's own Ray runtime: the caller's signal handlers stay in charge, and a signal
in the middle of the start ends with no Ray process left (that `--quiet` prints nothing of
Ray: test_cli_end_to_end.py).

Each in a child process (the test session's runtime is already up in this one).
"""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHILD = """
import json, signal, sys

class Stop(Exception):  # as the run's own handler raises it
    pass

def stop(signum, frame):
    raise Stop(signum)

for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, stop)
from shardprop.service.cluster.runtime import connect_ray
import ray

print("starting", flush=True)
try:
    connect_ray(None, 1)
    outcome = "started"
except Stop as error:
    outcome = f"stopped by {error.args[0]}"
kept = [signal.getsignal(sig) is stop for sig in (signal.SIGINT, signal.SIGTERM)]
seen = {"outcome": outcome, "kept": kept, "initialized": ray.is_initialized()}
if outcome == "started":
    try:
        signal.raise_signal(signal.SIGTERM)
    except Stop as error:
        seen["sigterm_raised"] = error.args[0]
    seen["task"] = ray.get(ray.remote(lambda: "done").remote(), timeout=120)
print(json.dumps(seen), flush=True)
sys.stdin.read()  # alive until the test has looked for Ray's processes
ray.shutdown()
"""


def processes() -> dict[int, tuple[int, str, str]]:
    """pid: (parent pid, name, command line) of every live process (Linux's /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # ended meanwhile
        name, _, rest = stat.partition(" (")[2].rpartition(") ")
        state, parent = rest.split()[:2]
        if state != "Z":
            table[int(entry.name)] = (int(parent), name, command)
    return table


def ray_processes(driver: int) -> list[str]:
    """The processes of the runtime `driver` started: its descendants, and any process that
    names its session (a Ray session folder ends with the pid of the driver that made it)."""
    table = processes()
    session = re.compile(rf"session_[\d_-]+_{driver}\b")
    found: set[int] = set()
    parents = {driver}
    while parents:
        parents = {pid for pid, row in table.items() if row[0] in parents} - found
        found |= parents
    found |= {pid for pid, row in table.items() if session.search(row[2])}
    return sorted(table[pid][1] for pid in found - {driver} if pid in table)


def start_child() -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "starting", child.communicate()[1][-3000:]
    return child


def wait_until(ready, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.05)
    return ready()


def test_the_callers_signal_handlers_stay_in_charge_once_ray_has_started():
    """ray.init's own SIGTERM handler would exit 15 past the run's, which marks it KILLED."""
    child = start_child()
    try:
        seen = json.loads(child.stdout.readline())
        assert seen["outcome"] == "started"
        assert seen["kept"] == [True, True]
        assert seen["sigterm_raised"] == signal.SIGTERM  # the caller's handler, not Ray's
        assert seen["task"] == "done"  # the runtime outlives the start
    finally:
        child.communicate("", timeout=120)
    assert child.returncode == 0, child.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_in_the_middle_of_the_start_reaches_the_caller_and_leaves_no_ray_process(
    signum,
):
    child = start_child()
    try:
        assert wait_until(lambda: "gcs_server" in ray_processes(child.pid), 60), (
            "Ray's local runtime did not begin to start"
        )
        child.send_signal(signum)
        seen = json.loads(child.stdout.readline())
        assert seen == {
            "outcome": f"stopped by {int(signum)}",
            "kept": [True, True],
            "initialized": False,
        }
        # the child is still alive: what it started is gone, not reaped at its exit
        assert wait_until(lambda: not ray_processes(child.pid), 10), ray_processes(child.pid)
    finally:
        child.communicate("", timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
