"""The all-reduce: shard sums added in rank order, divided by the total row count.

    g = (G_1 + ... + G_k) / (m_1 + ... + m_k)

is the full-batch mean gradient for any split; a mean of per-worker means is not, as soon as
shards differ in size. Adding in rank order makes a run bitwise repeatable; adding row
blocks along a fixed tree (`train.reduction: exact`, docs/exactness.md) makes it the same
bits for any number of workers.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shardprop.workers.reduction.sums import BlockSums, ShardSums


@dataclass
class BatchMean:
    grad: np.ndarray  # mean gradient over all rows
    loss: float  # mean loss
    rows: int
    accuracy: float | None
    # the task's metric tallies summed over all rows, not divided (training/metrics.py);
    # None when no row was there
    tallies: np.ndarray | None = None


def reduce_sums(parts: Sequence[ShardSums | BlockSums]) -> ShardSums:
    """Sum the shards' sums, rank 0 first, into one new gradient; block sums along the
    block tree."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total.total() if isinstance(total, BlockSums) else total


def batch_mean(total: ShardSums) -> BatchMean:
    rows = total.rows
    accuracy = None if total.correct is None else total.correct / rows
    return BatchMean(total.grad / rows, total.loss / rows, rows, accuracy, total.tallies)
