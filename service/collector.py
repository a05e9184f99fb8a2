"""The garbage collector around a run: no full collections while it starts, few after.

A full (oldest-generation) collection walks every object the process holds. Once MLflow,
SQLAlchemy, Ray, pandas and pyarrow are imported that takes 0.1–0.4 s, with the GIL held
against the training loop and the tracker's writer alike; start-up's imports set off several
and the tracker's writer, allocating ORM objects, more (measured on the default config: 1.3 s
of collections in a tracked run, 0.26 s untracked). Everything alive when the loop starts
lives as long as the run, so it is frozen out of the collector's walks (`gc.freeze`); the
loop's own garbage is still collected as usual.
"""

import gc
from types import TracebackType
from typing import Self


class RunCollection:
    """`with RunCollection() as collection: <start-up>; collection.started(); <loop>`.

    Leaves the collector as it found it: enabled or not, and frozen objects unfrozen again
    unless the caller had frozen some itself.
    """

    def __enter__(self) -> Self:
        self._was_enabled = gc.isenabled()
        self._froze = gc.get_freeze_count() == 0
        gc.disable()
        return self

    def started(self) -> None:
        """Start-up is over: what it built stays frozen, and collecting resumes."""
        gc.freeze()
        if self._was_enabled:
            gc.enable()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._froze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()
