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
