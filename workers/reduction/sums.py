"""The shard contract's numbers: SUMS over rows, never means, and how they add up.

`ShardSums` is one worker's rows in one sum (the rank-order reduction adds them rank 0
first); `BlockSums` is a worker's blocks as whole subtrees of the block tree (the exact
reduction, blocktree.py). Both carry the worker's timings for the step's metrics.
"""

import copy
from dataclasses import dataclass, field, replace
from typing import Self

import numpy as np

from shardprop.workers.reduction.blocktree import BlockGrid, Node, add_node, root


@dataclass
class Sums:
    grad: np.ndarray  # gradient sum, flat, in the parameter layout
    loss: float  # loss sum
    rows: int
    correct: int | None  # correctly classified rows; None for regression
    # the task's metric tallies summed over the rows (losses.py); None: no rows. Keyword
    # only, so the positional fields keep their places in ShardSums
    tallies: np.ndarray | None = field(default=None, kw_only=True)

    def __add__(self, other: "Sums") -> "Sums":
        """New sums; the operands stay as they are (they may be read-only)."""
        correct = None if self.correct is None else self.correct + other.correct
        return Sums(
            self.grad + other.grad,
            self.loss + other.loss,
            self.rows + other.rows,
            correct,
            tallies=add_tallies(self.tallies, other.tallies),
        )

    def __deepcopy__(self, memo: dict) -> Self:
        """The arrays copied, the numbers shared: all that reading sums out of a compiled
        graph's shared memory needs, at a fraction of a generic deep copy's cost."""
        return replace(self, grad=self.grad.copy(), tallies=copy_tallies(self.tallies))

    def __iadd__(self, other: "Sums") -> "Sums":
        """Add `other` into these sums, the gradient in place."""
        self.grad += other.grad
        self.loss += other.loss
        self.rows += other.rows
        if self.correct is not None:
            self.correct += other.correct
        self.tallies = add_tallies(self.tallies, other.tallies)
        return self


def add_tallies(left: np.ndarray | None, right: np.ndarray | None) -> np.ndarray | None:
    """left + right as a new array (either may be a read-only view); None adds nothing."""
    if left is None:
        return right
    if right is None:
        return left
    return left + right


def copy_tallies(tallies: np.ndarray | None) -> np.ndarray | None:
    return None if tallies is None else tallies.copy()


@dataclass
class Timed:
    """A worker's clock readings, to tell compute from communication."""

    seconds: float = 0.0  # compute time
    forward_seconds: float = 0.0  # the forward pass's part of it
    # (seconds, forward_seconds) per rank, in rank order, when these are several ranks' sums
    per_rank: tuple[tuple[float, float], ...] = ()

    def timings(self) -> tuple[tuple[float, float], ...]:
        return self.per_rank or ((self.seconds, self.forward_seconds),)

    def join_timings(self, other: "Timed") -> None:
        """Take on the timings of `other`, which holds the later ranks."""
        self.per_rank = self.timings() + other.timings()
        self.seconds = max(self.seconds, other.seconds)
        self.forward_seconds = max(self.forward_seconds, other.forward_seconds)

    def __add__(self, other: Self) -> Self:
        """Both ranks' sums as new ones, whichever kind of sums the workers return."""
        total = self.copy()
        total += other
        return total


@dataclass
class ShardSums(Timed, Sums):
    def __iadd__(self, other: "ShardSums") -> "ShardSums":
        """Add the sums of `other`, which holds the later ranks; the gradient in place."""
        super().__iadd__(other)
        self.join_timings(other)
        return self

    def copy(self) -> "ShardSums":
        """The same sums with a gradient of their own, to add others into."""
        return replace(
            self,
            grad=self.grad.copy(),
            tallies=copy_tallies(self.tallies),
            per_rank=self.timings(),
        )


@dataclass
class BlockSums(Timed):
    """Sums of whole subtrees of the block tree: a handful per worker, one when complete."""

    grid: BlockGrid = field(kw_only=True)
    nodes: dict[Node, Sums] = field(default_factory=dict, kw_only=True)

    def __iadd__(self, other: "BlockSums") -> "BlockSums":
        """Take in the subtrees of `other` (the later ranks), adding up those they complete."""
        for node, sums in other.nodes.items():
            add_node(self.nodes, node, sums, self.grid)
        self.join_timings(other)
        return self

    def __deepcopy__(self, memo: dict) -> Self:
        """Every node's gradient copied; the grid is frozen, the timings are numbers."""
        return replace(self, nodes={node: copy.deepcopy(sums) for node, sums in self.nodes.items()})

    def copy(self) -> "BlockSums":
        """Node sums are never changed in place, so sharing them is safe."""
        return replace(self, nodes=dict(self.nodes), per_rank=self.timings())

    def total(self) -> ShardSums:
        """Every block's sums as one, once every block is in."""
        sums = root(self.nodes, self.grid)
        return ShardSums(
            sums.grad,
            sums.loss,
            sums.rows,
            sums.correct,
            tallies=sums.tallies,
            seconds=self.seconds,
            forward_seconds=self.forward_seconds,
            per_rank=self.timings(),
        )
