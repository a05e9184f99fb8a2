"""Synthetic datasets: seeded, block-wise, the same rows whatever range asks for them."""

import numpy as np
import pyarrow as pa
import pytest

from shardprop.workers.data.synthetic import (
    BLOCK_ROWS,
    SyntheticSpec,
    feature_names,
    generate,
    schema,
)
from shardprop.workers.errors import DataError

NAMES = ["moons", "circles", "blobs", "regression"]


def arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    X = np.column_stack([table.column(c).to_numpy() for c in table.column_names[:-1]])
    return X, table.column("y").to_numpy()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_rows_other_seed_other_rows(name):
    spec = SyntheticSpec(name, rows=5000, seed=7)
    assert generate(spec, 0, 5000).equals(generate(spec, 0, 5000))
    other = SyntheticSpec(name, rows=5000, seed=8)
    assert not generate(spec, 0, 5000).equals(generate(other, 0, 5000))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("start", "stop"),
    [(37, 61), (0, 1), (BLOCK_ROWS - 3, BLOCK_ROWS + 5), (100, 2 * BLOCK_ROWS + 17), (9999, 10000)],
)
def test_any_range_equals_the_same_slice_of_the_whole(name, start, stop):
    spec = SyntheticSpec(name, rows=10_000, noise=0.3, seed=1)
    whole = generate(spec, 0, spec.rows)
    assert generate(spec, start, stop).equals(whole.slice(start, stop - start))


def test_rows_do_not_depend_on_the_dataset_size():
    """A block is drawn whole and cut, so growing `rows` only appends rows."""
    small = generate(SyntheticSpec("moons", rows=5000), 0, 5000)
    large = generate(SyntheticSpec("moons", rows=50_000), 0, 5000)
    assert small.equals(large)


@pytest.mark.parametrize(
    ("spec", "n_features", "label_type"),
    [
        (SyntheticSpec("moons", 100), 2, pa.int64()),
        (SyntheticSpec("circles", 100), 2, pa.int64()),
        (SyntheticSpec("blobs", 100), 2, pa.int64()),
        (SyntheticSpec("blobs", 100, features=5, classes=4), 5, pa.int64()),
        (SyntheticSpec("regression", 100), 8, pa.float64()),
        (SyntheticSpec("regression", 100, features=3), 3, pa.float64()),
    ],
)
def test_columns_and_types(spec, n_features, label_type):
    table = generate(spec, 10, 90)
    names = [f"x{j}" for j in range(n_features)]
    assert feature_names(spec) == names
    assert table.column_names == [*names, "y"]
    assert table.num_rows == 80
    assert table.schema == schema(spec)
    assert table.schema.field("y").type == label_type
    assert all(table.schema.field(c).type == pa.float64() for c in names)


def test_empty_range_has_the_schema():
    spec = SyntheticSpec("blobs", 10, features=3)
    assert generate(spec, 4, 4).schema == schema(spec) and generate(spec, 4, 4).num_rows == 0


@pytest.mark.parametrize(("name", "classes"), [("moons", 2), ("circles", 2), ("blobs", 3)])
def test_classes_are_roughly_balanced(name, classes):
    _, y = arrays(generate(SyntheticSpec(name, rows=30_000), 0, 30_000))
    assert set(np.unique(y)) == set(range(classes))
    assert np.bincount(y) / len(y) == pytest.approx(np.full(classes, 1 / classes), abs=0.02)


def test_noise_free_moons_lie_on_their_half_circles():
    X, y = arrays(generate(SyntheticSpec("moons", rows=2000, noise=0.0), 0, 2000))
    outer, inner = X[y == 0], X[y == 1]
    assert np.allclose(np.hypot(*outer.T), 1.0) and np.all(outer[:, 1] >= 0)
    assert np.allclose(np.hypot(inner[:, 0] - 1.0, inner[:, 1] - 0.5), 1.0)
    assert np.all(inner[:, 1] <= 0.5)


def test_noise_free_circles_have_radii_one_and_a_half():
    X, y = arrays(generate(SyntheticSpec("circles", rows=2000, noise=0.0), 0, 2000))
    radius = np.hypot(*X.T)
    assert np.allclose(radius[y == 0], 1.0) and np.allclose(radius[y == 1], 0.5)


def test_blob_centres_come_from_the_seed_not_the_block():
    spec = SyntheticSpec("blobs", rows=20 * BLOCK_ROWS, noise=0.0, classes=4, features=3)
    X_early, y_early = arrays(generate(spec, 0, 200))
    X_late, y_late = arrays(generate(spec, 15 * BLOCK_ROWS, 15 * BLOCK_ROWS + 200))
    for c in range(4):
        centre = X_early[y_early == c][0]
        assert np.all(X_early[y_early == c] == centre)
        assert np.all(X_late[y_late == c] == centre)
    # the cluster spread is the noise
    X, y = arrays(generate(SyntheticSpec("blobs", rows=20_000, noise=0.3), 0, 20_000))
    assert X[y == 0].std(axis=0) == pytest.approx([0.3, 0.3], rel=0.05)


def test_noise_free_regression_is_linear_plus_a_sine():
    X, y = arrays(generate(SyntheticSpec("regression", rows=3000, noise=0.0), 0, 3000))
    rest = y - np.sin(np.pi * X[:, 0])
    w, *_ = np.linalg.lstsq(X, rest, rcond=None)
    assert np.allclose(X @ w, rest)
    assert np.std(y - X @ np.linalg.lstsq(X, y, rcond=None)[0]) > 0.3  # not linear alone


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "moon", "rows": 10}, r"data\.synthetic\.name: unknown dataset 'moon'"),
        ({"name": "moons", "rows": 0}, r"data\.synthetic\.rows"),
        ({"name": "moons", "rows": 10, "noise": -0.1}, r"data\.synthetic\.noise"),
        ({"name": "moons", "rows": 10, "noise": float("nan")}, r"data\.synthetic\.noise"),
        ({"name": "moons", "rows": 10, "seed": -1}, r"data\.synthetic\.seed"),
        ({"name": "moons", "rows": 10, "features": 3}, r"data\.synthetic\.features: moons has"),
        ({"name": "circles", "rows": 10, "classes": 3}, r"data\.synthetic\.classes"),
        ({"name": "blobs", "rows": 10, "classes": 1}, r"data\.synthetic\.classes"),
        ({"name": "blobs", "rows": 10, "features": 0}, r"data\.synthetic\.features"),
        ({"name": "regression", "rows": 10, "classes": 2}, r"data\.synthetic\.classes"),
    ],
)
def test_bad_specs_name_the_key(kwargs, key):
    with pytest.raises(DataError, match=key):
        SyntheticSpec(**kwargs)


def test_range_outside_the_rows_is_refused():
    with pytest.raises(ValueError, match="outside"):
        generate(SyntheticSpec("moons", 10), 5, 11)


def test_tasks():
    assert [SyntheticSpec(name, 1).task for name in NAMES] == [
        "binary",
        "binary",
        "multiclass",
        "regression",
    ]
    assert SyntheticSpec("blobs", 1, classes=5).n_classes == 5
    assert SyntheticSpec("regression", 1).n_classes is None
