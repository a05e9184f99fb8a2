"""How a shard's columns are cut into chunks and spread over threads.

The network's math (backprop.py) runs on one chunk of columns at a time, through buffers one
chunk wide: a GEMM's output is still in cache when the elementwise pass and the next GEMM read
it, and a worker holds a chunk of activations per thread instead of its whole shard.

With several threads the columns are cut into one contiguous part per thread, each run on
single-threaded BLAS, like workers in one process: numpy's elementwise passes then use every
core too, and no BLAS thread spin-waits on a core between GEMMs. Sums are always added in
column order, so a call gives the same bits every time; the exact reduction's blocks are cut
by their own bounds alone, so a block's bits do not depend on the worker (docs/exactness.md).
"""

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Generic, TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info

from shardprop.workers.reduction.blocktree import BlockGrid, Node, add_node
from shardprop.workers.reduction.sums import BlockSums, Sums

B = TypeVar("B")  # one thread's buffers, one chunk wide
T = TypeVar("T")
# chunk(lo, hi, buffers, into): columns [lo, hi) through the buffers, their sums in `into`;
# returns them and the forward pass's seconds
Chunk = Callable[[int, int, B, np.ndarray], tuple[Sums, float]]

PART_MIN_ROWS = 2048  # fewer columns than this per part are not worth a thread
# a chunk's widest activation fits in L2 (figures: docs/performance.md, `bench network`)
CHUNK_BYTES = 2**20
CHUNK_COLUMNS = (512, 4096)
CHUNK_ALIGN = 64  # chunk widths are a multiple of this: GEMMs run slower on ragged widths


def chunk_columns(sizes: Sequence[int], dtype: np.dtype | str) -> int:
    """Columns a thread runs through forward and backward at a time."""
    fit = CHUNK_BYTES // (max(sizes[1:]) * np.dtype(dtype).itemsize)
    low, high = CHUNK_COLUMNS
    return min(high, max(low, fit // 256 * 256))


def blas_threads() -> int:
    """The threads BLAS uses now: a network made inside a threadpool limit keeps to it."""
    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)


class ChunkRunner(Generic[B]):
    """Runs a per-chunk function over a batch's columns, in chunks of `chunk` columns, one
    part of the columns per thread; keeps one set of buffers per thread between calls."""

    def __init__(self, make_buffers: Callable[[int], B], chunk: int, threads: int):
        """`make_buffers(width)`: one thread's buffers, `width` columns wide."""
        self.make_buffers = make_buffers
        self.chunk = chunk
        self.threads = threads
        self.buffers: list[B] = []  # one per thread, all `self.width` columns wide
        self.width = 0
        self._pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None
        self._blas = ThreadpoolController() if threads > 1 else None

    def scratch(self, parts: int, width: int) -> list[B]:
        """At least `parts` buffers at least `width` columns wide; only ever grown, so that a
        step allocates none."""
        if len(self.buffers) < parts or self.width < width:
            parts, width = max(parts, len(self.buffers)), max(width, self.width)
            self.buffers = []  # freed before the new ones are made
            self.buffers = [self.make_buffers(width) for _ in range(parts)]
            self.width = width
        return self.buffers

    def columns(self, chunk: Chunk, m: int, like: np.ndarray) -> tuple[Sums, float]:
        """`chunk` over columns [0, m), one contiguous part per thread, the parts' sums added
        in part order. Returns the sums and the first part's forward seconds (the parts ran
        side by side). `like`: an array shaped as the gradient sum."""
        parts = min(self.threads, max(1, m // PART_MIN_ROWS))
        scratch = self.scratch(parts, min(self.chunk, -(-m // parts)))

        def part(index: int, lo: int, hi: int) -> tuple[Sums, float]:
            return self._in_chunks(chunk, lo, hi, scratch[index], np.empty_like(like))

        results = self._side_by_side(part, m, parts)
        total = results[0][0]
        for sums, _ in results[1:]:
            total += sums
        return total, results[0][1]

    def blocks(
        self, chunk: Chunk, bounds: Sequence[int], first: int, grid: BlockGrid, like: np.ndarray
    ) -> BlockSums:
        """`chunk` over each block [bounds[j], bounds[j + 1]) (the dataset's block first + j),
        one contiguous range of blocks per thread, folded into the block tree as they come.

        Every node here is this call's own, so siblings are added in place and the right
        one's buffer serves a later block: a step allocates a few buffers, not one a block."""
        count = len(bounds) - 1
        parts = min(self.threads, count)
        widest = max(hi - lo for lo, hi in pairwise(bounds))
        scratch = self.scratch(parts, min(self.chunk, widest))
        spare: list[np.ndarray] = []  # list.append and list.pop are atomic: shared by threads

        def join(left: Sums, right: Sums) -> Sums:
            left += right
            spare.append(right.grad)
            return left

        def blocks(part: int, lo: int, hi: int) -> tuple[dict[Node, Sums], float]:
            nodes: dict[Node, Sums] = {}
            forward_seconds = 0.0
            for j in range(lo, hi):
                into = spare.pop() if spare else np.empty_like(like)
                sums, seconds = self._in_chunks(
                    chunk, bounds[j], bounds[j + 1], scratch[part], into
                )
                add_node(nodes, (0, first + j), sums, grid, join)
                forward_seconds += seconds
            return nodes, forward_seconds

        results = self._side_by_side(blocks, count, parts)
        total = BlockSums(forward_seconds=results[0][1], grid=grid)
        for nodes, _ in results:
            for node, sums in nodes.items():
                add_node(total.nodes, node, sums, grid, join)
        return total

    def _side_by_side(self, run: Callable[[int, int, int], T], count: int, parts: int) -> list[T]:
        """run(part, lo, hi) over [0, count) cut into `parts` contiguous ranges, the first in
        this thread and the others on the pool, all on single-threaded BLAS; results in
        order."""
        cuts = [count * i // parts for i in range(parts + 1)]
        if parts == 1:
            return [run(0, 0, count)]
        with self._blas.limit(limits=1, user_api="blas"):
            futures = [
                self._pool.submit(run, part, lo, hi)
                for part, (lo, hi) in enumerate(pairwise(cuts[1:]), start=1)
            ]
            return [run(0, 0, cuts[1]), *(future.result() for future in futures)]

    def _in_chunks(
        self, chunk: Chunk, lo: int, hi: int, buffers: B, into: np.ndarray
    ) -> tuple[Sums, float]:
        """`chunk` over columns [lo, hi) cut into as few chunks of at most `self.chunk`
        columns as there can be, all but the last a multiple of CHUNK_ALIGN columns wide and
        the last no runt, through `buffers`; the sums added in column order into `into`.
        Returns them and the forward seconds."""
        count = max(1, -(-(hi - lo) // self.chunk))
        even = -(-(hi - lo) // count)  # columns per chunk, cut evenly
        width = max(1, min(self.chunk, -(-even // CHUNK_ALIGN) * CHUNK_ALIGN))
        sums, forward_seconds = chunk(lo, min(hi, lo + width), buffers, into)
        spare = np.empty_like(into) if hi - lo > width else into
        for start in range(lo + width, hi, width):
            more, seconds = chunk(start, min(hi, start + width), buffers, spare)
            sums += more
            forward_seconds += seconds
        return sums, forward_seconds
