"""Who holds a run: a lease in one tag of the MLflow run, renewed while its process lives.

A process that trains a run holds it; another `resume` of that run is refused while the
holder lives. A holder that dies stops renewing, and its lease lapses: the run can be taken
over, and the next run started in its experiment marks it FAILED. On the holder's own host
its pid answers at once, so a run whose process was killed is free without waiting.

No MLflow here: the tag's value is plain JSON, read and written by the tracker.
"""

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Self

LEASE_TAG = "shardprop.lease"
# one tag write per renewal; a live holder may miss five (a store outage) before its lease lapses
RENEW_SECONDS = 10.0
LEASE_SECONDS = 60.0


def _pid_namespace() -> str:
    """Which pids this process sees: two containers may share a host name, never this."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # there, and someone else's
    return True


@dataclass(frozen=True)
class Lease:
    pid: int
    host: str
    until: float  # epoch seconds; 0 once the holder let go
    pid_namespace: str = ""

    @classmethod
    def ours(cls) -> Self:
        """A lease for this process, from now."""
        return cls(os.getpid(), socket.gethostname(), 0.0, _pid_namespace()).renewed()

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Self | None:
        """The lease a run's tags hold; None for a run without one (an older shardprop)."""
        try:
            value = json.loads(tags[LEASE_TAG])
            return cls(
                int(value["pid"]),
                str(value["host"]),
                float(value["until"]),
                str(value.get("pid_namespace", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def renewed(self) -> Self:
        return replace(self, until=time.time() + LEASE_SECONDS)

    def released(self) -> Self:
        return replace(self, until=0.0)

    def tag(self) -> str:
        return json.dumps(
            {
                "pid": self.pid,
                "host": self.host,
                "until": round(self.until, 1),
                "pid_namespace": self.pid_namespace,
            }
        )

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname() and self.pid_namespace == _pid_namespace()

    def alive(self) -> bool:
        """Whether the holder still holds the run: its lease runs, and on this host its
        process is there (a lapsed lease is dead even if the pid is, maybe reused, alive)."""
        if self.until <= time.time():
            return False
        return _pid_exists(self.pid) if self.on_this_host() else True

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"
