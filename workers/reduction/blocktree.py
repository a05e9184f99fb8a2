"""The exact reduction: fixed row blocks, added along one fixed binary tree.

Floating-point addition is not associative: the same numbers added in another grouping differ
in their last bits, so 2 workers' sums differ from 1 worker's. Here the grouping never
changes. The rows are cut into blocks whose bounds depend only on the row count; each block's
sums are taken on their own; and block sums are added along the binary tree over the block
indices, whose node (k, i) covers blocks [i 2^k, (i + 1) 2^k). A node's sums are always
left + right, or left alone when the right half lies past the last block, whoever adds them:
a worker adds the whole subtrees inside its blocks, the coordinator the rest. Any split of the
blocks over workers, and any order in which the pieces arrive, gives the same bits.
"""

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from shardprop.workers.data.split import contiguous_ranges
from shardprop.workers.errors import DataError

Node = tuple[int, int]  # (level k, index i): blocks [i 2^k, (i + 1) 2^k)
S = TypeVar("S")

# block sizes for `block_rows: null`: about TARGET_BLOCKS blocks, so that workers balance to
# a block's rows, but no smaller than MIN_BLOCK_ROWS rows (each block costs a dozen numpy
# calls) unless that would leave fewer than MIN_BLOCKS, and no larger than MAX_BLOCK_ROWS
TARGET_BLOCKS = 64
MIN_BLOCKS = 8
MIN_BLOCK_ROWS = 1024
MAX_BLOCK_ROWS = 8192
BLOCK_ALIGN = 64  # workers/network/chunks.py's CHUNK_ALIGN


def auto_block_rows(rows: int, chunk: int = 1) -> int:
    """`chunk`: the columns a worker runs through the network at a time. A block is a whole
    number of chunks where that keeps MIN_BLOCKS blocks, else of BLOCK_ALIGN columns: cut
    into chunks narrower than the rank-order step's, or with a ragged last one, the exact
    step ran up to a fifth slower (figures: docs/performance.md)."""
    floor = min(MIN_BLOCK_ROWS, math.ceil(rows / MIN_BLOCKS))
    block = max(1, min(MAX_BLOCK_ROWS, max(floor, math.ceil(rows / TARGET_BLOCKS))))
    for align in (chunk, BLOCK_ALIGN):
        aligned = -(-block // align) * align
        if math.ceil(rows / aligned) >= MIN_BLOCKS:
            return aligned
    return block


@dataclass(frozen=True)
class BlockGrid:
    """The dataset's rows cut into blocks of `block_rows` (the last one may be partial)."""

    rows: int
    block_rows: int

    @classmethod
    def for_rows(cls, rows: int, block_rows: int | None = None, chunk: int = 1) -> "BlockGrid":
        return cls(rows, block_rows or auto_block_rows(rows, chunk))

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    @property
    def top(self) -> int:
        """The root's level: the smallest k with 2^k >= blocks."""
        return (self.blocks - 1).bit_length()

    def split(self, workers: int) -> list[tuple[int, int]]:
        """Contiguous (start, stop) rows per rank, in whole blocks; the first ranks get one
        block more."""
        if workers > self.blocks:
            raise DataError(
                f"cluster.workers: {workers} workers but the exact reduction cuts the "
                f"{self.rows} rows into {self.blocks} blocks of {self.block_rows}; use at most "
                f"{self.blocks} workers or a smaller train.block_rows"
            )
        return [
            (first * self.block_rows, min(stop * self.block_rows, self.rows))
            for first, stop in contiguous_ranges(self.blocks, workers)
        ]

    def bounds(self, start: int, stop: int) -> list[int]:
        """The block bounds inside rows [start, stop), which must be whole blocks, relative
        to `start`: [0, ..., stop - start]."""
        if start % self.block_rows or (stop % self.block_rows and stop != self.rows):
            raise ValueError(f"rows [{start}, {stop}) are not whole blocks of {self.block_rows}")
        return [*range(0, stop - start, self.block_rows), stop - start]


def add_node(
    nodes: dict[Node, S],
    node: Node,
    sums: S,
    grid: BlockGrid,
    join: Callable[[S, S], S] = operator.add,
) -> None:
    """Put one node's sums into `nodes`, adding it up with every sibling already there into
    the largest whole subtree it completes. `join(left, right)` adds two siblings; `+` by
    default, which leaves its operands as they are (they may be read-only views of Ray's
    object store)."""
    level, index = node
    while level < grid.top:
        if index % 2:
            left = nodes.pop((level, index - 1), None)
            if left is None:
                break
            sums = join(left, sums)
        elif (index + 1) << level < grid.blocks:
            right = nodes.pop((level, index + 1), None)
            if right is None:
                break
            sums = join(sums, right)
        # else the right half is past the last block: the parent's sums are this node's
        level, index = level + 1, index // 2
    nodes[(level, index)] = sums


def subtree_count(grid: BlockGrid, start: int, stop: int) -> int:
    """How many whole subtrees a worker holding rows [start, stop) sends per step."""
    nodes: dict[Node, int] = {}
    for block in range(start // grid.block_rows, -(-stop // grid.block_rows)):
        add_node(nodes, (0, block), 0, grid)
    return len(nodes)


def root(nodes: dict[Node, S], grid: BlockGrid) -> S:
    """The sums of every block, once all of them have been added."""
    if list(nodes) != [(grid.top, 0)]:
        raise ValueError(f"the block tree is incomplete: it holds the subtrees {sorted(nodes)}")
    return nodes[(grid.top, 0)]
