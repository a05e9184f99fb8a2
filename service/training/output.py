"""The run's output folder: held by one process at a time, and by one run for good.

The hold is an advisory lock on `OUT/.lock` (fcntl.flock), which the kernel releases however
the process ends, kill -9 included. `OUT/run.json` names the run the folder belongs to, so a
second run never writes its checkpoints beside another run's (a resume would then pick the
wrong ones).
"""

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from shardprop.service.errors import ConfigError
from shardprop.service.tracking.store import check_writable

LOCK_FILE = ".lock"
OWNER_FILE = "run.json"


class OutputFolder:
    """`with OutputFolder(path) as out: out.hold(run_id); ...; out.own(run_id)`."""

    def __init__(self, path: Path):
        self.path = path
        self._lock: IO[str] | None = None

    def hold(self, run_id: str | None) -> None:
        """Take the folder for `run_id` (None: a new run), or one ConfigError line: another
        live process has it, or it holds another run's outputs."""
        check_writable(self.path, "--output", "the output folder")
        self.path.mkdir(parents=True, exist_ok=True)
        lock = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise ConfigError(
                f"--output {self.path}: in use by {holder}; wait for it to end, or choose "
                "another folder"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._lock = lock
        owner = self.owner()
        if owner is not None and owner != run_id:
            self._refuse(f"run {owner}'s outputs")
        if owner is None and run_id is None and any((self.path / "checkpoints").glob("step-*")):
            self._refuse("an earlier run's checkpoints")

    def _refuse(self, what: str) -> None:
        self.release()
        raise ConfigError(
            f"--output {self.path}: holds {what}; choose another folder "
            "(or go on with that run: shardprop resume RUN_ID)"
        )

    def owner(self) -> str | None:
        owner_file = self.path / OWNER_FILE
        if not owner_file.exists():
            return None
        return json.loads(owner_file.read_text())["run_id"]

    def own(self, run_id: str) -> None:
        """Mark the folder as `run_id`'s for good (the lock is held)."""
        (self.path / OWNER_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
