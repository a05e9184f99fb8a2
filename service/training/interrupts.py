"""Ctrl-C and SIGTERM stop a run at any moment, start-up included, but never mid-update.

While a run holds `stop_requests()`, SIGINT and SIGTERM raise `Interrupted` at once, so a
wait on Ray or MLflow ends with them. Inside `deferred()` (a step's update, a checkpoint) the
first signal only asks, and is raised when the block ends: the weights are never left half
updated. A second signal is raised at once, wherever the run is.
"""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupted(Exception):  # noqa: N818 - a stop the user asked for, not an error
    """The run stopped on a signal; MLflow marks it KILLED."""

    run_status = "KILLED"

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


def stopped_by(signum: int) -> Interrupted:
    return Interrupted(signum, f"stopped by {signal.Signals(signum).name}")


class StopRequests:
    """Which signal, if any, asked the run to stop; raises it where the run can stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = 0  # nesting depth of deferred()
        self._held: int | None = None  # a signal deferred() keeps until its block ends

    def _ask(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        if first and self._deferring:
            self._held = signum
            return
        raise stopped_by(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a first signal does not break into: it is raised when the block ends."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._held is not None and not self._deferring:
            signum, self._held = self._held, None
            raise stopped_by(signum)


@contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Catch SIGINT and SIGTERM while the block runs (main thread only; elsewhere the
    requests never come and `deferred` only runs its block)."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {sig: signal.signal(sig, requests._ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
