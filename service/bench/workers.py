"""The benchmark's worker: a ShardWorker with a step that skips the math."""

import numpy as np

from shardprop.workers.reduction.sums import ShardSums
from shardprop.workers.shard import ShardWorker


class BenchWorker(ShardWorker):
    def null_gradient(self, theta: np.ndarray) -> ShardSums:
        """The gradient call minus the math: sums of the real size, all zero. What moving a
        step's parameters and sums costs on its own (`shardprop bench`)."""
        return ShardSums(np.zeros_like(theta), 0.0, self.stop - self.start, 0)
