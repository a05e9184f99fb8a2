"""The interpreter around a run: start-up tuned for two threads, the loop for one.

Start-up runs two threads side by side: the main one starting Ray and the workers, mostly
waiting on other processes, and one importing MLflow and opening its store, all CPU and GIL.

- The GIL's switch interval is cut from 5 ms to 0.5 ms while both run, so the main thread
  gets the GIL back within 0.5 ms each time a wait ends. `ray.init()` beside MLflow's
  opening took 2.8–4.0 s with 5 ms (median 3.9 over 8) and mostly 2.8–3.1 s with 0.5 ms
  (median 2.9; 2.5–3.5 s alone). In whole default runs the gain is within their noise.
- No full (oldest-generation) garbage collection runs while they start. Once MLflow,
  SQLAlchemy, Ray, pandas and pyarrow are imported, one takes 0.1–0.4 s with the GIL held;
  start-up's imports set off several, and the tracker's writer, allocating ORM objects,
  more (measured on the default config: 1.3 s of collections in a tracked run, 0.26 s
  untracked). Everything alive when the loop starts lives as long as the run, so it is
  frozen out of the collector's walks (`gc.freeze`); the loop's own garbage is collected as
  usual.
"""

import gc
import sys
from types import TracebackType
from typing import Self

STARTUP_SWITCH_SECONDS = 0.0005


class RunInterpreter:
    """`with RunInterpreter() as interpreter: <start-up>; interpreter.started(); <loop>`.

    Leaves the interpreter as it found it: the switch interval, the collector enabled or
    not, and frozen objects unfrozen again unless the caller had frozen some itself.
    """

    def __enter__(self) -> Self:
        self._switch = sys.getswitchinterval()
        self._was_enabled = gc.isenabled()
        self._froze = gc.get_freeze_count() == 0
        sys.setswitchinterval(min(self._switch, STARTUP_SWITCH_SECONDS))
        gc.disable()
        return self

    def started(self) -> None:
        """Start-up is over: what it built stays frozen; collecting and switching as usual."""
        sys.setswitchinterval(self._switch)
        gc.freeze()
        if self._was_enabled:
            gc.enable()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        sys.setswitchinterval(self._switch)
        if self._froze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()
