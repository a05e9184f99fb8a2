"""Ctrl-C and SIGTERM end a run at a step boundary: never in the middle of an update.

The first signal only asks; the loop checks between steps, writes a checkpoint and stops with
`Interrupted`. A second Ctrl-C interrupts at once (the default behaviour is back by then).
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


class StopRequests:
    """Which signal, if any, asked the run to stop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _ask(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(
            signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        )


@contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Catch SIGINT and SIGTERM while the block runs (main thread only; elsewhere a no-op)."""
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
