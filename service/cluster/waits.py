"""Waits on Ray that a signal can end.

Ray's blocking calls (ray.get, ray.wait, a compiled graph's results) wait in C++. A signal
sent meanwhile is often taken by one of Ray's own threads, and Python runs its handler only in
the main thread, once that thread runs Python again: a Ctrl-C during a step that never ends
would never be handled. So the call runs in a thread of its own, and the main thread waits
for it in short naps, between which its handlers run.
(upstream fix: a ray.get that returns to Python when a signal arrives)
"""

import threading
from collections.abc import Callable
from typing import Any, TypeVar

NAP_SECONDS = 0.1  # how late a signal may be handled
T = TypeVar("T")


def wait_for(done: threading.Event) -> None:
    """Wait for `done` in naps, so this thread's signal handlers run meanwhile (an Event,
    not Thread.join: a join that a handler interrupts can take a live thread for ended)."""
    while not done.wait(NAP_SECONDS):
        pass


def interruptible(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)`, which may block in Ray; in the main thread, a signal handler
    that raises ends the wait at once (the call itself is left to end in its thread)."""
    if threading.current_thread() is not threading.main_thread():
        return call(*args, **kwargs)  # no handler runs here anyway
    done = threading.Event()
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, call(*args, **kwargs)))
        except BaseException as error:  # raised again in the waiting thread
            outcome.append((False, error))
        finally:
            done.set()

    threading.Thread(target=run, name="ray-wait", daemon=True).start()
    wait_for(done)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
