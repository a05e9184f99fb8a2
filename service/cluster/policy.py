"""What to do when a worker is lost: a decision, made without Ray so it can be tested alone.

Full-batch gradient descent is deterministic, so a lost worker costs only the step it was
in: its replacement re-reads the same rows and the step is computed again from the same
parameters. The update is applied once, after every shard's sums are in.
"""

from dataclasses import dataclass, field
from enum import Enum


class Decision(Enum):
    REPLACE = "replace"  # start a new worker on the same rows and compute the step again
    RAISE = "raise"  # give up: the run fails, its last checkpoint stays


@dataclass
class FailurePolicy:
    max_failures: int
    failures: list[tuple[int, str]] = field(default_factory=list)  # (rank, what happened)

    def on_lost(self, rank: int, reason: str) -> Decision:
        self.failures.append((rank, reason))
        return Decision.REPLACE if len(self.failures) <= self.max_failures else Decision.RAISE

    @property
    def restarts(self) -> int:
        return min(len(self.failures), self.max_failures)


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
