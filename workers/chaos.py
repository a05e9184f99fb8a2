"""A ShardWorker that can be made to fail: what `--inject-failure` spawns, and nothing else.

The group calls one of these methods instead of `gradient` on the worker and step that
`cluster.inject_failure` names (`service/cluster/policy.py`).
"""

import os
import signal
import threading

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
