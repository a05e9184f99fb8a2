"""The run's last line when Ray ends the coordinator without one.

Ray ends a driver whose node is lost (its raylet and object store gone) with a hard exit: no
`except`, `finally` or atexit of ours runs, so the run cannot say where its checkpoint is nor
mark its MLflow run. A small process started beside `train` and `resume` learns the run's id,
store and output folder; when the command ends without saying it is done, the watchdog marks
the run FAILED and prints the line the run would have: the last good weights and the resume
command. (A Ray option to raise in the driver instead would make this unneeded.)
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

DONE = "done"
WAIT_SECONDS = 10  # for the watchdog to read "done" and end


class Watchdog:
    """The command's side, a context: told the run once it is open, and, on leaving the
    context however Python leaves it (success, an error, a signal), that it is done."""

    def __enter__(self) -> "Watchdog":
        # its stdin is the one line to it; it writes to the command's own stderr
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, text=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._say(DONE)
        self._process.stdin.close()
        try:
            self._process.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()

    def opened(self, run_id: str | None, tracking_uri: str | None, output: Path) -> None:
        self._say(json.dumps({"run": run_id, "uri": tracking_uri, "output": str(output)}))

    def _say(self, line: str) -> None:
        try:
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the watchdog is gone: nothing to tell


def watch(lines: list[str] | None = None) -> str | None:
    """What to say when the command's lines end without `done`; None when nothing is."""
    opened = None
    for line in lines if lines is not None else sys.stdin:
        if line.strip() == DONE:
            return None
        opened = json.loads(line)
    if opened is None:
        return None  # ended before a run was open: nothing was kept, nothing to go on with
    from shardprop.service.training.checkpoint import go_on

    run, uri, output = opened["run"], opened["uri"], Path(opened["output"])
    if run and uri:
        mark_failed(uri, run)
    return (
        "failed: the run ended without a word: Ray ends a coordinator whose node is lost, "
        f"and a kill -9 does the same{go_on(output, run if uri else None, uri)}"
    )


def mark_failed(tracking_uri: str, run_id: str) -> None:
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception as error:  # the store may be what failed: the line is what matters
        print(f"warning: could not mark run {run_id} FAILED ({error})", file=sys.stderr)


if __name__ == "__main__":
    # a Ctrl-C or SIGTERM is for the command, which ends and says so: this waits for it
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    if said := watch():
        print(said, file=sys.stderr)
