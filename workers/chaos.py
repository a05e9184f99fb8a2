"""Failures on purpose: the `--inject-failure` spec, and the ShardWorker subclass that the
group spawns only when one is asked for. On the worker and step the spec names, the group
calls one of its methods instead of `gradient`.
"""

import os
import signal
import threading
from dataclasses import dataclass

import numpy as np

from shardprop.workers.shard import ShardWorker


class ChaosWorker(ShardWorker):
    def die(self, *_: object) -> None:
        """End this process the way `kill -9` does."""
        os.kill(os.getpid(), signal.SIGKILL)

    def gradient_then_die(self, theta: np.ndarray) -> None:
        """Compute the step's sums, then die before handing them over."""
        self.gradient(theta)
        self.die()

    def hang(self, *_: object) -> None:
        """Never answer, as a worker stuck on a dead disk or network would."""
        threading.Event().wait()


# when=... -> the ChaosWorker method called instead of `gradient`
WHEN = {"before": "die", "after": "gradient_then_die", "hang": "hang"}


@dataclass
class InjectedFailure:
    """`--inject-failure worker=R,step=S[,times=N][,when=before|after|hang]`: kill worker R's
    process at step S, N times in a row (its replacements too), before it computes the step's
    gradient or after it computed it but before the coordinator collects it; or make it hang
    (never answer), which `cluster.step_timeout` turns into a lost worker."""

    worker: int
    step: int
    times: int = 1
    when: str = "before"

    @classmethod
    def parse(cls, text: str) -> "InjectedFailure":
        fields: dict[str, str] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected key=value, got {item!r}")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"worker", "step", "times", "when"}
        if unknown or not {"worker", "step"} <= set(fields):
            raise ValueError("expected worker=R,step=S[,times=N][,when=before|after|hang]")
        when = fields.get("when", "before")
        if when not in WHEN:
            raise ValueError(f"when={when!r}: expected one of {', '.join(WHEN)}")
        try:
            injected = cls(
                int(fields["worker"]), int(fields["step"]), int(fields.get("times", 1)), when
            )
        except ValueError:
            raise ValueError("worker, step and times must be whole numbers") from None
        if injected.worker < 0 or injected.step < 1 or injected.times < 1:
            raise ValueError("worker >= 0, step >= 1 and times >= 1")
        return injected
