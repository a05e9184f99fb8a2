"""Seeded synthetic datasets that any worker can generate for its own rows alone.

Rows are made in blocks of BLOCK_ROWS: block b draws from np.random.default_rng([seed, b]),
so rows [start, stop) cost only the blocks they touch and are the same rows whichever range
they are asked for in. That is what lets a worker "read" a synthetic shard exactly like a
file: no coordinator generates the whole dataset and ships it around.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shardprop.workers.errors import DataError

BLOCK_ROWS = 4096
LABEL = "y"
BLOBS_BOX = 1.0  # blob centres are uniform in [-BLOBS_BOX, BLOBS_BOX]^features


@dataclass(frozen=True)
class SyntheticSpec:
    """Which dataset, how many rows, and its knobs; `features`/`classes` None: the default."""

    name: str
    rows: int
    noise: float = 0.2
    seed: int = 0
    features: int | None = None
    classes: int | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise DataError(
                f"data.synthetic.name: unknown dataset {self.name!r}; "
                f"expected one of {', '.join(DATASETS)}"
            )
        if self.rows < 1:
            raise DataError(f"data.synthetic.rows: must be at least 1, got {self.rows}")
        if not self.noise >= 0:  # also refuses NaN
            raise DataError(f"data.synthetic.noise: must be >= 0, got {self.noise}")
        if self.seed < 0:
            raise DataError(f"data.synthetic.seed: must be >= 0, got {self.seed}")
        fixed_features = {"moons": 2, "circles": 2}.get(self.name)
        if fixed_features and self.features not in (None, fixed_features):
            raise DataError(
                f"data.synthetic.features: {self.name} has exactly {fixed_features} features, "
                f"got {self.features}"
            )
        if self.features is not None and self.features < 1:
            raise DataError(f"data.synthetic.features: must be at least 1, got {self.features}")
        if self.name == "blobs":
            if self.classes is not None and self.classes < 2:
                raise DataError(f"data.synthetic.classes: must be at least 2, got {self.classes}")
        elif self.name == "regression":
            if self.classes is not None:
                raise DataError("data.synthetic.classes: regression has no classes; leave it unset")
        elif self.classes not in (None, 2):
            raise DataError(
                f"data.synthetic.classes: {self.name} has 2 classes, got {self.classes}"
            )

    @property
    def n_features(self) -> int:
        default = 8 if self.name == "regression" else 2
        return self.features if self.features is not None else default

    @property
    def n_classes(self) -> int | None:
        """Number of classes; None for regression."""
        if self.name == "regression":
            return None
        if self.name == "blobs":
            return self.classes if self.classes is not None else 3
        return 2

    @property
    def task(self) -> str:
        """The task the dataset is made for: binary, multiclass or regression."""
        if self.name == "regression":
            return "regression"
        return "multiclass" if self.name == "blobs" else "binary"


def feature_names(spec: SyntheticSpec) -> list[str]:
    return [f"x{j}" for j in range(spec.n_features)]


def schema(spec: SyntheticSpec) -> pa.Schema:
    """The columns generate() returns: float64 features x0.., label y (int64 or float64)."""
    label_type = pa.float64() if spec.task == "regression" else pa.int64()
    return pa.schema(
        [pa.field(name, pa.float64()) for name in feature_names(spec)] + [(LABEL, label_type)]
    )


def generate(spec: SyntheticSpec, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the dataset, identical whatever range they are requested in."""
    if not 0 <= start <= stop <= spec.rows:
        raise ValueError(f"row range [{start}, {stop}) is outside [0, {spec.rows})")
    make = DATASETS[spec.name]
    shared = _dataset_wide(spec)
    X_parts, y_parts = [], []
    for b in range(start // BLOCK_ROWS, -(-stop // BLOCK_ROWS)):
        # whole blocks are drawn then cut, so a row never depends on the range asked for
        X, y = make(np.random.default_rng([spec.seed, b]), spec, shared)
        lo = max(start - b * BLOCK_ROWS, 0)
        hi = min(stop - b * BLOCK_ROWS, BLOCK_ROWS)
        X_parts.append(X[lo:hi])
        y_parts.append(y[lo:hi])
    out = schema(spec)
    X = np.concatenate(X_parts) if X_parts else np.empty((0, spec.n_features))  # (m, n0)
    y = np.concatenate(y_parts) if y_parts else np.empty(0)  # (m,)
    # one transpose, then each column is contiguous: no strided copy per column
    columns = [pa.array(column) for column in np.ascontiguousarray(X.T)]
    columns.append(pa.array(y, type=out.field(LABEL).type))
    return pa.Table.from_arrays(columns, schema=out)


def _dataset_wide(spec: SyntheticSpec) -> np.ndarray:
    """Draws shared by all blocks (blob centres, regression weights): from the seed alone.

    A spawned child, not default_rng([seed]): SeedSequence zero-pads, so [seed] would be the
    very stream of block 0, [seed, 0].
    """
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(0,)))
    if spec.name == "blobs":
        n_classes = spec.n_classes or 0
        return rng.uniform(-BLOBS_BOX, BLOBS_BOX, size=(n_classes, spec.n_features))
    if spec.name == "regression":
        return rng.standard_normal(spec.n_features) / np.sqrt(spec.n_features)
    return np.empty(0)


Block = tuple[np.ndarray, np.ndarray]  # X (BLOCK_ROWS, n0), y (BLOCK_ROWS,)


def _moons(rng: np.random.Generator, spec: SyntheticSpec, shared: np.ndarray) -> Block:
    """Two interleaved half circles, as sklearn.datasets.make_moons draws them."""
    y = rng.integers(0, 2, BLOCK_ROWS)
    t = rng.uniform(0.0, np.pi, BLOCK_ROWS)
    X = np.where(
        (y == 0)[:, None],
        np.column_stack([np.cos(t), np.sin(t)]),
        np.column_stack([1.0 - np.cos(t), 0.5 - np.sin(t)]),
    )
    return X + spec.noise * rng.standard_normal(X.shape), y


def _circles(rng: np.random.Generator, spec: SyntheticSpec, shared: np.ndarray) -> Block:
    """A circle (label 0) around a smaller one of half the radius (label 1)."""
    factor = 0.5
    y = rng.integers(0, 2, BLOCK_ROWS)
    t = rng.uniform(0.0, 2.0 * np.pi, BLOCK_ROWS)
    radius = np.where(y == 0, 1.0, factor)
    X = radius[:, None] * np.column_stack([np.cos(t), np.sin(t)])
    return X + spec.noise * rng.standard_normal(X.shape), y


def _blobs(rng: np.random.Generator, spec: SyntheticSpec, centres: np.ndarray) -> Block:
    """Gaussian clusters around fixed centres; noise is the clusters' standard deviation."""
    y = rng.integers(0, len(centres), BLOCK_ROWS)
    X = centres[y] + spec.noise * rng.standard_normal((BLOCK_ROWS, centres.shape[1]))
    return X, y


def _regression(rng: np.random.Generator, spec: SyntheticSpec, weights: np.ndarray) -> Block:
    """y = X w + sin(pi x0) + noise: linear with one bend a linear model cannot fit."""
    X = rng.standard_normal((BLOCK_ROWS, len(weights)))
    y = X @ weights + np.sin(np.pi * X[:, 0]) + spec.noise * rng.standard_normal(BLOCK_ROWS)
    return X, y


DATASETS: dict[str, Callable[[np.random.Generator, SyntheticSpec, np.ndarray], Block]] = {
    "moons": _moons,
    "circles": _circles,
    "blobs": _blobs,
    "regression": _regression,
}
