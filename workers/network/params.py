"""The parameter vector: one flat contiguous array with per-layer views; init; weights files.

Layer l owns one contiguous block holding the matrix [W_l | b_l] of shape
(n_l, n_{l-1} + 1). W_l and b_l are views into it. Keeping b_l as the last column lets one
GEMM against activations that carry a row of ones compute W A + b in the forward pass and
[dW | db] in the backward pass, with no separate bias pass over the data.
"""

import hashlib
import io
import os
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from shardprop.workers.errors import WeightsFileError

INIT_SCHEMES = ("he", "xavier", "normal")


@dataclass(frozen=True)
class Layout:
    """Where each layer's parameters live in the flat vector, for sizes (n0, n1, ..., nL)."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or any(int(n) < 1 for n in self.sizes):
            raise ValueError(f"layer sizes must be >= 2 positive integers, got {self.sizes}")

    @property
    def depth(self) -> int:
        """L, the number of layers with parameters."""
        return len(self.sizes) - 1

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        blocks = [n * (n_prev + 1) for n_prev, n in zip(self.sizes, self.sizes[1:], strict=False)]
        return tuple(np.concatenate([[0], np.cumsum(blocks)]).tolist())

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def blocks(self, theta: np.ndarray) -> list[np.ndarray]:
        """The views [W_l | b_l], each (n_l, n_{l-1} + 1), for l = 1..L."""
        return [
            theta[start:stop].reshape(n, n_prev + 1)
            for start, stop, n_prev, n in zip(
                self.offsets, self.offsets[1:], self.sizes, self.sizes[1:], strict=False
            )
        ]

    def weights(self, theta: np.ndarray) -> list[np.ndarray]:
        return [block[:, :-1] for block in self.blocks(theta)]

    def biases(self, theta: np.ndarray) -> list[np.ndarray]:
        return [block[:, -1] for block in self.blocks(theta)]

    @cached_property
    def weight_mask(self) -> np.ndarray:
        """True where the flat vector holds a weight, False where it holds a bias."""
        mask = np.ones(self.size, dtype=bool)
        for bias in self.biases(mask):
            bias[...] = False
        return mask

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for l, (n_prev, n) in enumerate(zip(self.sizes, self.sizes[1:], strict=False), 1):
            shapes[f"W{l}"] = (n, n_prev)
            shapes[f"b{l}"] = (n,)
        return shapes


def init_params(layout: Layout, scheme: str, seed: int, dtype: np.dtype | str) -> np.ndarray:
    """Fresh parameters: weights drawn from N(0, scale^2) per layer, biases zero.

    Drawn in float64 from one seeded generator, layer by layer, so the result depends on the
    seed and the sizes only (never on the worker count), and float32 is the same draw rounded.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; expected one of {', '.join(INIT_SCHEMES)}")
    rng = np.random.default_rng(seed)
    theta = np.zeros(layout.size, dtype=np.float64)
    for W in layout.weights(theta):
        fan_out, fan_in = W.shape
        scale = {
            "he": np.sqrt(2.0 / fan_in),
            "xavier": np.sqrt(2.0 / (fan_in + fan_out)),
            "normal": 0.01,
        }[scheme]
        W[...] = rng.standard_normal(W.shape) * scale
    return theta.astype(dtype)


def to_arrays(layout: Layout, theta: np.ndarray) -> dict[str, np.ndarray]:
    """The weights-file arrays W1..WL, b1..bL as contiguous copies."""
    arrays: dict[str, np.ndarray] = {}
    for l, (W, b) in enumerate(zip(layout.weights(theta), layout.biases(theta), strict=True), 1):
        arrays[f"W{l}"] = np.ascontiguousarray(W)
        arrays[f"b{l}"] = np.ascontiguousarray(b)
    return arrays


def from_arrays(layout: Layout, arrays: dict[str, np.ndarray], dtype: np.dtype | str) -> np.ndarray:
    theta = np.empty(layout.size, dtype=dtype)
    for l, (W, b) in enumerate(zip(layout.weights(theta), layout.biases(theta), strict=True), 1):
        W[...] = arrays[f"W{l}"]
        b[...] = arrays[f"b{l}"]
    return theta


def fingerprint(theta: np.ndarray) -> str:
    """sha256 of the parameters' bytes: equal for two runs exactly when their weights are."""
    return hashlib.sha256(np.ascontiguousarray(theta).tobytes()).hexdigest()


def save_weights(path: str | os.PathLike, layout: Layout, theta: np.ndarray) -> Path:
    """Write the .npz weights file atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # zipped in memory: a full disk fails the write below, not numpy's
    np.savez(buffer, **to_arrays(layout, theta))
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.tmp", delete=False) as tmp:
        try:
            tmp.write(buffer.getbuffer())
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)
    return path


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of a weights file, refusing pickles and anything that is not a float array."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            arrays = {}
            for name in names:
                try:
                    arrays[name] = npz[name]
                except ValueError:
                    raise WeightsFileError(
                        f"{path}: array {name!r} holds pickled Python objects; "
                        "a weights file holds float arrays only"
                    ) from None
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: no such weights file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise WeightsFileError(f"{path}: not a readable .npz weights file ({error})") from None
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise WeightsFileError(
                f"{path}: array {name!r} has dtype {array.dtype}; expected a float array"
            )
        bad = np.count_nonzero(~np.isfinite(array))
        if bad:
            raise WeightsFileError(f"{path}: array {name!r} has {bad} non-finite values (NaN/inf)")
    return arrays


def sizes_of(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The layer sizes (n0, ..., nL) a weights file describes, checked for consistency."""
    depth = sum(1 for name in arrays if name.startswith("W"))
    weights = [arrays.get(f"W{l}") for l in range(1, depth + 1)]
    if depth == 0 or any(W is None or W.ndim != 2 for W in weights):
        raise WeightsFileError(f"{path}: expected 2-d arrays W1..WL and b1..bL")
    sizes = (weights[0].shape[1], *(W.shape[0] for W in weights))
    check_shapes(path, arrays, Layout(sizes))
    return sizes


def check_shapes(path: str | os.PathLike, arrays: dict[str, np.ndarray], layout: Layout) -> None:
    expected = layout.expected_shapes()
    for name, shape in expected.items():
        if name not in arrays:
            raise WeightsFileError(f"{path}: missing array {name!r} of shape {shape}")
        if arrays[name].shape != shape:
            raise WeightsFileError(
                f"{path}: array {name!r} has shape {arrays[name].shape}; expected {shape}"
            )
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        raise WeightsFileError(
            f"{path}: unexpected arrays {', '.join(unexpected)}; "
            f"expected exactly {', '.join(expected)}"
        )


def load_weights(
    path: str | os.PathLike, layout: Layout | None = None, dtype: np.dtype | str = np.float64
) -> tuple[Layout, np.ndarray]:
    """Read a weights file into a flat vector; with a layout, the file must match it."""
    arrays = read_weights(path)
    if layout is None:
        layout = Layout(sizes_of(path, arrays))
    else:
        check_shapes(path, arrays, layout)
    return layout, from_arrays(layout, arrays, dtype)
