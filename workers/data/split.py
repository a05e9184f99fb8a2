"""How rows are split: into contiguous ranges, one per worker, and into training and
validation rows.

A row's validation side is decided from its global index and the seed alone: it never
depends on which worker holds it or how many workers there are, so every worker count trains
on the same rows and validates on the same rows.
"""

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def contiguous_ranges(count: int, parts: int) -> list[tuple[int, int]]:
    """[0, count) as `parts` contiguous (start, stop) ranges, in order; the first
    count % parts ranges are one longer."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: consecutive integers in, well-spread 64-bit values out."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def validation_mask(start: int, stop: int, fraction: float, seed: int) -> np.ndarray:
    """True for the rows in [start, stop) that belong to the validation split."""
    if fraction <= 0:
        return np.zeros(stop - start, dtype=bool)
    index = np.arange(start, stop, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        key = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * GOLDEN + np.uint64(1))
        hashed = _mix(index * GOLDEN + key)
    # the top 53 bits as a uniform draw in [0, 1)
    return (hashed >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction
