"""From the shards' statistics to a training setup, and the batches the workers prepare with
it: the same setup and the same batches, to the bit, for any number of shards; the checks on
missing and infinite values; what data.task auto decides; constant columns.

ShardWorker objects run in-process on real Parquet files, as the worker group's `--workers 0`
does."""

from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from shardprop.service.config import DataConfig
from shardprop.service.data.plan import DataPlan, plan_data, write_table
from shardprop.service.data.prepare import (
    DataSetup,
    decide,
    is_constant,
    merge_moments,
    scan_levels,
)
from shardprop.workers.data.columns import MISSING_LEVEL, encode
from shardprop.workers.data.split import validation_mask
from shardprop.workers.errors import DataError
from shardprop.workers.network.backprop import Architecture
from shardprop.workers.shard import ShardStats, ShardWorker, block_moments

ROWS = 530
FIRST_FILE = 230  # the files' boundary falls inside a shard for 2 and 3 shards
BLOCK_ROWS = 40  # 14 blocks, the last one partial: 2 shards of 280 + 250, 3 of 200 + 200 + 130
ROW_GROUP_ROWS = 64
FRACTION, SEED = 0.2, 7
NAN = np.nan


def mixed_table(rows: int = ROWS, seed: int = 1) -> pa.Table:
    """Every kind of column a real table has: a float with NaN and nulls, an integer with a
    large offset, text with nulls, a dictionary, booleans, an integer to list in
    data.categorical, a timestamp (left out), a regression target in the thousands and a
    class label."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal(rows)
    f[rng.random(rows) < 0.05] = NAN
    city = rng.choice(["oslo", "lima", "pune", "kyiv"], rows).astype(object)
    city[rng.random(rows) < 0.05] = None
    return pa.table(
        {
            "f": pa.array(f, mask=rng.random(rows) < 0.05),
            "big": 1_000_000_000 + rng.integers(0, 50, rows),
            "city": pa.array(city, pa.string()),
            "color": pa.array(rng.choice(["red", "green", "blue"], rows)).dictionary_encode(),
            "flag": pa.array(rng.random(rows) < 0.3),
            "grade": rng.integers(1, 6, rows),
            "when": pa.array(np.arange(rows), pa.timestamp("ms")),
            "price": 3000 + 500 * rng.standard_normal(rows),
            "kind": rng.choice(["cat", "dog", "eel"], rows),
        }
    )


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, pa.Table]:
    """The mixed table in two Parquet files of uneven size, with several row groups each."""
    folder = tmp_path_factory.mktemp("mixed")
    table = mixed_table()
    write_table(table.slice(0, FIRST_FILE), folder / "part-0.parquet", ROW_GROUP_ROWS)
    write_table(table.slice(FIRST_FILE), folder / "part-1.parquet", ROW_GROUP_ROWS)
    return folder, table


def config_for(path: Path, label: str, **data) -> DataConfig:
    return DataConfig(path=str(path), label=label, categorical=["grade"], **data)


def load_shards(
    path: Path, config: DataConfig, shards: int, exact: bool = True, block_rows: int = BLOCK_ROWS
) -> tuple[DataPlan, list[ShardWorker], list[ShardStats]]:
    plan = plan_data(
        str(path),
        None,
        config.label,
        config.features,
        shards,
        exact=exact,
        block_rows=block_rows,
        categorical=config.categorical,
    )
    workers = [
        ShardWorker(rank, plan.source, plan.columns, plan.label, start, stop, grid=plan.grid)
        for rank, (start, stop) in enumerate(plan.shards)
    ]
    stats = [worker.load(config.validation_fraction, SEED, config.missing) for worker in workers]
    return plan, workers, stats


def run_setup(
    path: Path, config: DataConfig, shards: int = 1, **plan_options
) -> tuple[DataPlan, list[ShardWorker], DataSetup]:
    """Plan, load and decide, as a run does before its first step; the workers prepared."""
    plan, workers, stats = load_shards(path, config, shards, **plan_options)
    setup = decide(stats, plan.columns, config, plan.left_out)
    arch = Architecture((setup.width, 3, setup.outputs), "relu", setup.task)
    for worker in workers:
        worker.prepare(
            arch, "float64", setup.columns, setup.classes, setup.mean, setup.std, setup.target
        )
    return plan, workers, setup


def joined(workers: list[ShardWorker], batch: str, part: str) -> np.ndarray:
    """A batch's X or Y of every worker, side by side in rank order."""
    return np.concatenate([getattr(getattr(w, batch), part) for w in workers], axis=1)


def assert_same_bits(a: np.ndarray | None, b: np.ndarray | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def assert_same_setup(a: DataSetup, b: DataSetup) -> None:
    assert (a.task, a.classes, a.rows, a.val_rows, a.dropped) == (
        b.task,
        b.classes,
        b.rows,
        b.val_rows,
        b.dropped,
    )
    assert a.columns == b.columns  # names, kinds, levels (in order) and fills
    fills = [np.array([c.fill for c in s.columns], np.float64) for s in (a, b)]  # None: NaN
    assert_same_bits(*fills)
    assert_same_bits(a.mean, b.mean)
    assert_same_bits(a.std, b.std)
    assert_same_bits(
        None if a.target is None else np.array(a.target),
        None if b.target is None else np.array(b.target),
    )
    assert a.notes == b.notes


def rows_without_missing(table: pa.Table) -> np.ndarray:
    """The rows data.missing: drop keeps, found here from the table itself."""
    used = [name for name in table.column_names if name != "when"]
    absent = [
        table.column(name).is_null(nan_is_null=True).to_numpy(zero_copy_only=False) for name in used
    ]
    return ~np.any(absent, axis=0)


# the same setup and the same batches for 1, 2, 3 shards


@pytest.mark.parametrize("missing_mode", ["impute", "drop"])
@pytest.mark.parametrize("label", ["price", "kind"])
def test_any_shard_count_gives_the_same_setup_and_batches_to_the_bit(mixed, label, missing_mode):
    folder, _ = mixed
    config = config_for(folder, label, missing=missing_mode, validation_fraction=FRACTION)
    _, one, setup = run_setup(folder, config, 1)
    for shards in (2, 3):
        plan, workers, other = run_setup(folder, config, shards)
        sizes = [stop - start for start, stop in plan.shards]
        assert len(sizes) == shards and len(set(sizes)) > 1  # uneven shards
        assert_same_setup(other, setup)
        for batch in ("batch", "val_batch"):
            for part in ("X", "Y"):
                assert_same_bits(joined(workers, batch, part), joined(one, batch, part))


def test_the_setup_says_how_each_column_is_used_and_what_is_left_out(mixed):
    folder, _ = mixed
    config = config_for(folder, "price", missing="impute", validation_fraction=FRACTION)
    _, _, setup = run_setup(folder, config, 2)
    kinds = {column.name: (column.kind, column.levels) for column in setup.columns}
    assert kinds == {
        "f": ("numeric", ()),
        "big": ("numeric", ()),
        "city": ("categorical", ("kyiv", "lima", "oslo", "pune", MISSING_LEVEL)),
        "color": ("categorical", ("blue", "green", "red")),
        "flag": ("categorical", (False, True)),
        "grade": ("categorical", (1, 2, 3, 4, 5)),
        "kind": ("categorical", ("cat", "dog", "eel")),
    }
    assert setup.width == 2 + 5 + 3 + 2 + 5 + 3
    assert setup.notes == [
        "data.task auto: regression, as label 'price' has fractional values",
        "columns: f (numeric), big (numeric), city (categorical, 4 levels + missing), "
        "color (categorical, 3 levels), flag (categorical, 2 levels), "
        "grade (categorical, 5 levels), kind (categorical, 3 levels) -> 20 inputs; "
        "left out: when (type timestamp[ms] is neither a number nor a category)",
    ]


def test_impute_fills_with_the_training_mean_and_standardises_with_training_statistics(mixed):
    folder, table = mixed
    config = config_for(folder, "price", missing="impute", validation_fraction=FRACTION)
    _, workers, setup = run_setup(folder, config, 3)
    train = ~validation_mask(0, ROWS, FRACTION, SEED)
    f = np.asarray(pc.fill_null(table.column("f"), NAN).to_numpy(), np.float64)[train]
    fill = np.nanmean(f)
    assert setup.columns[0].fill == pytest.approx(fill, rel=1e-13)
    f = np.where(np.isnan(f), fill, f)  # the imputed column is what is standardised
    big = table.column("big").to_numpy()[train].astype(np.float64)
    np.testing.assert_allclose(setup.mean[:2], [f.mean(), big.mean()], rtol=1e-15)
    np.testing.assert_allclose(setup.std[:2], [f.std(), big.std()], rtol=1e-9)
    assert (setup.mean[2:], setup.std[2:]) == pytest.approx((0.0, 1.0))  # one-hot inputs
    X = joined(workers, "batch", "X")
    assert not np.isnan(X).any()
    # big's mean, about 1e9, is good to a few of its float64 steps (1.2e-7 each)
    np.testing.assert_allclose(X[:2].mean(axis=1), 0.0, atol=1e-7)
    np.testing.assert_allclose(X[:2].std(axis=1), 1.0, rtol=1e-9)
    at = 2  # city: every row has exactly one input set, the missing level included
    np.testing.assert_array_equal(X[at : at + 5].sum(axis=0), 1.0)
    city = table.column("city").to_numpy(zero_copy_only=False)[train]
    np.testing.assert_array_equal(X[at + 4], [value is None for value in city])


def test_a_standardised_target_trains_at_unit_scale_and_maps_back_to_its_units(mixed):
    folder, table = mixed
    config = config_for(folder, "price", missing="impute", validation_fraction=FRACTION)
    _, workers, setup = run_setup(folder, config, 2)
    Y = joined(workers, "batch", "Y")
    assert abs(Y.mean()) < 1e-12 and Y.std() == pytest.approx(1.0, rel=1e-12)
    mean, std = setup.target
    assert 2500 < mean < 3500 and 300 < std < 700
    train = ~validation_mask(0, ROWS, FRACTION, SEED)
    price = table.column("price").to_numpy()
    np.testing.assert_allclose(Y[0] * std + mean, price[train], rtol=1e-13)
    val = joined(workers, "val_batch", "Y")[0]
    np.testing.assert_allclose(val * std + mean, price[~train], rtol=1e-13)


def test_without_standardize_target_the_target_is_raw(mixed):
    folder, table = mixed
    config = config_for(
        folder, "price", missing="impute", validation_fraction=FRACTION, standardize_target=False
    )
    _, workers, setup = run_setup(folder, config, 2)
    assert setup.target is None
    train = ~validation_mask(0, ROWS, FRACTION, SEED)
    np.testing.assert_array_equal(
        joined(workers, "batch", "Y")[0], table["price"].to_numpy()[train]
    )


def test_a_class_label_becomes_sorted_classes_one_hot(mixed):
    folder, table = mixed
    config = config_for(folder, "kind", missing="impute", validation_fraction=FRACTION)
    _, workers, setup = run_setup(folder, config, 3)
    assert (setup.task, setup.classes, setup.target) == ("multiclass", ["cat", "dog", "eel"], None)
    Y = joined(workers, "batch", "Y")
    train = ~validation_mask(0, ROWS, FRACTION, SEED)
    kind = table.column("kind").to_numpy(zero_copy_only=False)[train]
    np.testing.assert_array_equal(np.array(setup.classes)[Y.argmax(axis=0)], kind)
    np.testing.assert_array_equal(Y.sum(axis=0), 1.0)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_drop_leaves_out_the_rows_with_a_missing_value_and_keeps_the_validation_rows(mixed, shards):
    folder, table = mixed
    config = config_for(folder, "price", missing="drop", validation_fraction=FRACTION)
    _, workers, setup = run_setup(folder, config, shards)
    keep = rows_without_missing(table)
    val = validation_mask(0, ROWS, FRACTION, SEED)
    assert setup.dropped == ROWS - keep.sum() > 0
    assert (setup.rows, setup.val_rows) == ((keep & ~val).sum(), (keep & val).sum())
    assert f"data.missing drop: {setup.dropped} rows with a missing value left out" in setup.notes
    assert all(
        column.fill is None and MISSING_LEVEL not in column.levels for column in setup.columns
    )
    price = table.column("price").to_numpy()
    mean, std = setup.target
    for batch, rows in (("batch", keep & ~val), ("val_batch", keep & val)):
        assert not np.isnan(joined(workers, batch, "X")).any()
        np.testing.assert_allclose(
            joined(workers, batch, "Y")[0] * std + mean, price[rows], rtol=1e-13
        )


# check_values: missing and infinite values, null labels


def write_one(tmp_path: Path, columns: dict, name: str = "t.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def setup_of(path: Path, shards: int = 1, **data) -> DataSetup:
    config = DataConfig(path=str(path), **data)
    plan, _, stats = load_shards(path, config, shards, exact=False)
    return decide(stats, plan.columns, config, plan.left_out)


def test_missing_error_names_the_column_the_count_and_the_first_row(tmp_path):
    x = [1.0, 2.0, 3.0, 4.0, NAN, 6.0, None, 8.0]
    path = write_one(tmp_path, {"a": np.arange(8.0), "x": pa.array(x), "y": [0, 1] * 4})
    with pytest.raises(DataError) as error:
        setup_of(path, shards=2)  # rows 0-3 are clean, the first missing one is shard 1's
    assert str(error.value) == (
        f"column 'x' has 2 missing values (null or NaN) (first at row 4 of {path}); "
        "set data.missing: drop or impute, or clean them"
    )


def test_a_missing_category_is_refused_too_under_error(tmp_path):
    path = write_one(tmp_path, {"c": ["a", "b", None, "a"], "y": [0, 1, 0, 1]})
    with pytest.raises(DataError, match=rf"column 'c' has 1 missing .*first at row 2 of {path}"):
        setup_of(path)


@pytest.mark.parametrize("missing_mode", ["error", "drop", "impute"])
def test_infinite_values_are_refused_whatever_data_missing_says(tmp_path, missing_mode):
    x = [1.0, NAN, 3.0, -np.inf, 5.0, np.inf]
    path = write_one(tmp_path, {"x": x, "y": [0, 1] * 3})
    with pytest.raises(DataError, match=r"column 'x' has 2 infinite values \(first at row 3 of"):
        setup_of(path, missing=missing_mode)


@pytest.mark.parametrize("missing_mode", ["error", "impute"])
def test_a_null_label_is_refused_under_error_and_impute(tmp_path, missing_mode):
    path = write_one(tmp_path, {"x": np.arange(6.0), "y": pa.array([0, 1, None, 1, 0, None])})
    with pytest.raises(DataError) as error:
        setup_of(path, missing=missing_mode)
    assert str(error.value).startswith(
        f"label column 'y' has 2 null or NaN values (first at row 2 of {path}); "
        "set data.missing: drop"
    )


def test_a_null_label_is_dropped_under_drop(tmp_path):
    y = pa.array([0.5, 1.5, None, 2.5, NAN, 3.5])
    path = write_one(tmp_path, {"x": np.arange(6.0), "y": y})
    setup = setup_of(path, missing="drop", task="regression")
    assert (setup.rows, setup.dropped) == (4, 2)
    assert setup.target == pytest.approx((2.0, np.sqrt(1.25)))


@pytest.mark.parametrize("missing_mode", ["error", "drop", "impute"])
def test_an_infinite_label_is_refused_as_infinite_whatever_data_missing_says(
    tmp_path, missing_mode
):
    path = write_one(tmp_path, {"x": np.arange(4.0), "y": [1.0, np.inf, 2.5, 3.0]})
    with pytest.raises(DataError, match=r"label column 'y' has 1 infinite value"):
        setup_of(path, missing=missing_mode, task="regression")


def test_every_row_dropped_is_a_data_error(tmp_path):
    path = write_one(tmp_path, {"x": [NAN, NAN], "y": [0, 1]})
    with pytest.raises(DataError, match=r"no rows \(2 dropped\)"):
        setup_of(path, missing="drop")


# data.task: auto


def task_of(tmp_path: Path, labels: pa.Array, task: str = "auto") -> DataSetup:
    path = write_one(tmp_path, {"x": np.arange(float(len(labels))), "y": labels})
    return setup_of(path, task=task)


def test_text_labels_are_classes_and_the_note_says_why(tmp_path):
    setup = task_of(tmp_path, pa.array(["eel", "cat", "dog", "cat"] * 3))
    assert (setup.task, setup.classes) == ("multiclass", ["cat", "dog", "eel"])
    assert (
        setup.notes[0] == "data.task auto: multiclass, as label 'y' holds text, 3 distinct values"
    )


def test_two_text_labels_are_binary(tmp_path):
    setup = task_of(tmp_path, pa.array(["yes", "no", "no"]))
    assert (setup.task, setup.classes) == ("binary", ["no", "yes"])


@pytest.mark.parametrize("kind", [pa.int64(), pa.float64()])
def test_258_whole_numbers_ask_for_data_task(tmp_path, kind):
    labels = pa.array(100 + np.arange(2 * 258) % 258, kind)  # prices rounded to the dollar
    with pytest.raises(DataError) as error:
        task_of(tmp_path, labels)
    message = str(error.value)
    assert "258 classes" in message and "set data.task: regression" in message


def test_fractional_labels_are_regression(tmp_path):
    setup = task_of(tmp_path, pa.array([1.0, 2.0, 2.5, 1.0]))
    assert (setup.task, setup.classes) == ("regression", None)
    assert setup.notes[0] == "data.task auto: regression, as label 'y' has fractional values"


def test_more_than_1000_distinct_whole_numbers_are_regression(tmp_path):
    setup = task_of(tmp_path, pa.array(np.arange(1001) * 3, pa.int64()))
    assert setup.task == "regression"
    assert setup.notes[0] == (
        "data.task auto: regression, as label 'y' has more than 1000 distinct whole numbers"
    )


def test_258_classes_are_allowed_when_asked_for(tmp_path):
    setup = task_of(tmp_path, pa.array(np.arange(2 * 258) % 258, pa.int64()), task="multiclass")
    assert (setup.task, setup.classes) == ("multiclass", list(range(258)))
    assert not any(note.startswith("data.task auto") for note in setup.notes)


def test_a_few_whole_numbers_are_classes_and_the_note_says_so(tmp_path):
    setup = task_of(tmp_path, pa.array([3, 1, 2, 1], pa.int64()))
    assert (setup.task, setup.classes) == ("multiclass", [1, 2, 3])
    assert setup.notes[0] == (
        "data.task auto: multiclass, as label 'y' holds whole numbers, 3 distinct values"
    )


# merge_moments: per-entry counts


def moments_over(X: np.ndarray, cuts: list[int]) -> tuple[np.ndarray, ...]:
    bounds = [0, *cuts, X.shape[1]]
    return merge_moments([block_moments(X[:, lo:hi]) for lo, hi in pairwise(bounds)])


def random_cuts(rng: np.random.Generator, m: int) -> list[int]:
    """Up to 8 sorted cuts of [0, m], at least one part empty."""
    cuts = sorted(rng.integers(0, m + 1, rng.integers(0, 8)).tolist())
    return [*cuts, cuts[-1]] if cuts else [0]


@pytest.mark.parametrize("seed", range(8))
def test_merged_moments_equal_numpy_over_the_whole_column_for_any_split(seed):
    rng = np.random.default_rng(seed)
    m = 200
    X = np.vstack([rng.standard_normal(m), rng.exponential(5.0, m), rng.standard_normal(m)])
    X[rng.random(X.shape) < 0.2] = NAN  # each entry has its own count
    X[2, : m // 2] = NAN  # an entry missing in whole parts
    count, mean, m2 = moments_over(X, random_cuts(rng, m))
    np.testing.assert_array_equal(count, (~np.isnan(X)).sum(axis=1))
    np.testing.assert_allclose(mean, np.nanmean(X, axis=1), rtol=1e-13)
    np.testing.assert_allclose(m2 / count, np.nanvar(X, axis=1), rtol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_merged_moments_keep_the_spread_of_a_column_with_a_large_offset(seed):
    rng = np.random.default_rng(seed)
    x = 1e9 + rng.standard_normal(200)  # raw sums of squares would keep no digit of var
    x[rng.random(200) < 0.2] = NAN
    count, mean, m2 = moments_over(x[None, :], random_cuts(rng, 200))
    np.testing.assert_allclose(mean, np.nanmean(x), rtol=1e-15)
    # the part means, about 1e9, are good to a float64 step (1.2e-7) each
    np.testing.assert_allclose(m2 / count, np.nanvar(x), rtol=1e-6)


def test_empty_parts_change_nothing():
    X = np.array([[1.0, 2.0, NAN, 4.0], [NAN, NAN, NAN, 8.0]])
    whole = moments_over(X, [])
    for cuts in ([0], [4], [0, 0, 2, 2, 4], [2, 3, 3]):
        split = moments_over(X, cuts)
        np.testing.assert_array_equal(split[0], whole[0])
        np.testing.assert_allclose(split[1:], whole[1:], rtol=1e-15)
    np.testing.assert_array_equal(whole[0], [3, 1])
    np.testing.assert_allclose(whole[1], [7 / 3, 8.0])


# constant columns


def test_a_constant_columns_rounding_spread_counts_as_constant():
    x = np.full((1, 1001), 0.1)
    count, mean, m2 = merge_moments([block_moments(x)])
    var = m2 / count
    assert var[0] > 0  # the sum of 1001 times 0.1 is not exact
    assert is_constant(var, mean, 1001).all()


@pytest.mark.parametrize("spread", [1e-9, 1e-6, 1.0])
def test_a_small_real_spread_is_not_constant(spread):
    x = 0.1 + spread * np.random.default_rng(0).standard_normal((1, 1001))
    count, mean, m2 = merge_moments([block_moments(x)])
    assert not is_constant(m2 / count, mean, 1001).any()


def test_a_constant_feature_is_scaled_by_1_and_a_nearly_constant_one_by_its_spread(tmp_path):
    rng = np.random.default_rng(3)
    rows = 1001
    near = 0.1 + 1e-9 * rng.standard_normal(rows)
    path = write_one(
        tmp_path,
        {"const": np.full(rows, 0.1), "near": near, "y": rng.standard_normal(rows)},
    )
    config = DataConfig(path=str(path))
    plan, _, stats = load_shards(path, config, 1, exact=False)
    [(_, _, m2)] = stats[0].moments
    assert m2[0] > 0  # the constant column's computed spread is not exactly 0
    setup = decide(stats, plan.columns, config)
    assert setup.std[0] == 1.0
    assert setup.std[1] == pytest.approx(near.std(), rel=1e-6)
    X, _ = encode(setup.columns, pa.table({"const": [0.11], "near": [0.1]}))
    standardised = (X[:, 0] - setup.mean) / setup.std
    assert standardised[0] == pytest.approx(0.01, rel=1e-9)  # not 1e14


def test_a_constant_target_is_scaled_by_1(tmp_path):
    path = write_one(tmp_path, {"x": np.arange(1001.0), "y": np.full(1001, 0.1)})
    setup = setup_of(path, task="regression")
    assert setup.target[1] == 1.0
    assert setup.target[0] == pytest.approx(0.1, rel=1e-15)


# scan_levels: what `shardprop plan` reports


def with_rare_levels(table: pa.Table) -> pa.Table:
    """The table with the level "zurich" in one validation row only and "rome" in one
    training row only."""
    val = validation_mask(0, table.num_rows, FRACTION, SEED)
    city = table.column("city").to_pylist()
    city[int(np.flatnonzero(val)[0])] = "zurich"
    city[int(np.flatnonzero(~val)[-1])] = "rome"
    return table.set_column(2, "city", pa.array(city, pa.string()))


@pytest.mark.parametrize(
    "options",
    [
        {"missing": "impute"},
        {"missing": "impute", "max_categories": 3, "categories_over_max": "other"},
        {"missing": "impute", "max_categories": 4, "categories_over_max": "other"},
    ],
)
def test_scan_levels_finds_the_levels_the_workers_find(tmp_path, options):
    table = with_rare_levels(mixed_table())
    write_table(table.slice(0, FIRST_FILE), tmp_path / "part-0.parquet", ROW_GROUP_ROWS)
    write_table(table.slice(FIRST_FILE), tmp_path / "part-1.parquet", ROW_GROUP_ROWS)
    config = config_for(tmp_path, "price", validation_fraction=FRACTION, **options)
    plan, _, setup = run_setup(tmp_path, config, 3)
    scanned = scan_levels(plan, config, SEED, rows_at_once=97)
    assert [(c.name, c.levels, c.other) for c in scanned] == [
        (c.name, c.levels, c.other) for c in setup.columns
    ]
    city = next(column for column in scanned if column.name == "city")
    assert "zurich" not in city.levels  # a validation row's level is not a training level
    if not city.other:
        assert "rome" in city.levels


def test_scan_levels_under_drop_leaves_out_the_dropped_rows_levels(tmp_path):
    table = pa.table(
        {
            "x": pa.array([1.0, None, 2.0, 3.0, 4.0, 5.0]),
            "c": ["a", "rare", "a", "b", "b", "a"],
            "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.5],
        }
    )
    path = write_one(tmp_path, dict(zip(table.column_names, table.columns, strict=True)))
    config = DataConfig(path=str(path), missing="drop")
    plan, _, setup = run_setup(path, config, 1, exact=False)
    assert setup.columns[1].levels == ("a", "b")  # the row with "rare" is dropped
    assert scan_levels(plan, config, 0)[1].levels == setup.columns[1].levels
