"""From the shards' statistics to a training setup: checks, task, classes, standardisation.

Each worker describes its own rows; these functions reduce those descriptions in rank order,
so the checks cover every row and the statistics are those of the whole training set.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from shardprop.service.config import DataConfig
from shardprop.service.data.plan import DataPlan
from shardprop.service.errors import DataError
from shardprop.workers.data.columns import (
    CATEGORICAL,
    MISSING_LEVEL,
    NUMERIC,
    Column,
    choose_levels,
    level_counts,
    merge_counts,
    missing,
    width_of,
)
from shardprop.workers.data.split import validation_mask
from shardprop.workers.shard import MAX_LABEL_VALUES, ShardStats

SCAN_ROWS = 1_000_000  # rows `shardprop plan` reads at a time to count levels
AUTO_MAX_CLASSES = 100  # data.task auto: more classes than this asks the user for data.task


@dataclass
class DataSetup:
    task: str  # binary | multiclass | regression
    classes: list | None  # sorted original labels (classification)
    columns: tuple[Column, ...]  # the features with their levels and fills
    mean: np.ndarray | None  # per input (one-hot inputs: 0), None without standardisation
    std: np.ndarray | None  # per input (one-hot and constant inputs: 1)
    target: tuple[float, float] | None  # regression: the label's (mean, std) it trains on
    rows: int  # training rows
    val_rows: int
    dropped: int = 0  # rows left out for a missing value
    incomplete: frozenset[str] = frozenset()  # feature columns with a missing value somewhere
    notes: list[str] = field(default_factory=list)  # what was decided, said once at the start

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.task == "multiclass" else 1

    @property
    def width(self) -> int:
        """The network's input units: numeric columns and one-hot levels."""
        return width_of(self.columns)


def merge_moments(
    parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per entry: count, mean and sum of squared deviations of all values, from each part's
    (count, mean, m2), in the given order (Chan et al.'s pairwise update).

    Merging per-part means and deviations keeps the precision that raw sums of squares
    would lose on features with a large offset.
    """
    count = np.zeros(len(parts[0][0]), np.int64)
    mean, m2 = np.zeros(len(count)), np.zeros(len(count))
    for part_count, part_mean, part_m2 in parts:
        total = count + part_count
        share = np.divide(part_count, total, out=np.zeros(len(count)), where=total > 0)
        delta = part_mean - mean
        mean = mean + delta * share
        m2 = m2 + part_m2 + delta**2 * (count * share)
        count = total
    return count, mean, m2


def is_constant(var: np.ndarray, mean: np.ndarray, rows: int) -> np.ndarray:
    """A spread within rounding of the mean counts as none, as scikit-learn's StandardScaler
    decides: the sum of a constant column is not exact, so its variance is rarely 0."""
    eps = np.finfo(np.float64).eps
    return var <= rows * eps * var + (rows * mean * eps) ** 2


def check_values(
    parts: Sequence[ShardStats], columns: Sequence[Column], config: DataConfig
) -> None:
    """Infinite values never train; missing ones only as data.missing says."""
    names = [column.name for column in columns]
    _refuse(parts, names, "infinite", "infinite values", "clean them before training")
    if config.missing == "error":
        _refuse(
            parts,
            names,
            "missing",
            "missing values (null or NaN)",
            "set data.missing: drop or impute, or clean them",
        )
    label_infinite = sum(part.label_infinite for part in parts)
    if label_infinite:
        first = next(part.first_infinite[config.label] for part in parts if part.label_infinite)
        raise DataError(
            f"label column {config.label!r} has {label_infinite} infinite values (first at "
            f"{first}); clean them before training"
        )
    label_nulls = sum(part.label_nulls for part in parts)
    if label_nulls and config.missing != "drop":
        first = next(part.first_bad[config.label] for part in parts if part.label_nulls)
        raise DataError(
            f"label column {config.label!r} has {label_nulls} null or NaN values (first at "
            f"{first}); set data.missing: drop to leave those rows out, or clean them"
        )


def _refuse(parts: Sequence[ShardStats], names: list[str], kind: str, what: str, fix: str) -> None:
    """A DataError for the first column with `kind` values (ShardStats.missing or .infinite)."""
    wheres = "first_bad" if kind == "missing" else "first_infinite"
    counts = sum(getattr(part, kind) for part in parts)
    for i, (column, count) in enumerate(zip(names, counts, strict=True)):
        if count:
            first = next(getattr(p, wheres)[column] for p in parts if getattr(p, kind)[i])
            raise DataError(f"column {column!r} has {count} {what} (first at {first}); {fix}")


def decide_task(parts: Sequence[ShardStats], config: DataConfig) -> tuple[str, list | None, str]:
    """The task, for classification the sorted classes (labels of any type), and what
    data.task auto decided and why (empty when the task was given)."""
    kind = parts[0].label_kind
    fractional = any(part.label_fractional for part in parts)
    values = sorted(set().union(*(part.label_values for part in parts)))
    many = len(values) > MAX_LABEL_VALUES
    count = f"more than {MAX_LABEL_VALUES}" if many else str(len(values))
    where = f"label column {config.label!r}"
    task, why = config.task, ""
    if task == "auto":
        if kind != "string" and fractional:
            task, why = "regression", "has fractional values"
        elif kind != "string" and many:
            task, why = "regression", f"has {count} distinct whole numbers"
        else:
            task = "binary" if len(values) <= 2 else "multiclass"
            held = {"string": "text", "bool": "booleans"}.get(kind, "whole numbers")
            why = f"holds {held}, {count} distinct values"
            if len(values) > AUTO_MAX_CLASSES:
                raise DataError(
                    f"data.task: auto would make {where} ({held}) {count} classes; set "
                    "data.task: regression, or multiclass if they are classes"
                )
    if task == "regression":
        if kind == "string":
            raise DataError(f"{where} holds strings; data.task regression needs numbers")
        return task, None, why
    if fractional:
        raise DataError(f"{where} has fractional values; data.task {task} needs class labels")
    if many:
        raise DataError(f"{where} has {count} distinct values: too many for data.task {task}")
    if len(values) < 2 or (task == "binary" and len(values) != 2):
        need = "exactly two" if task == "binary" else "at least two"
        raise DataError(f"{where} has {count} distinct values; data.task {task} needs {need}")
    return task, values, why


def decide_levels(
    parts: Sequence[ShardStats], columns: Sequence[Column], config: DataConfig
) -> list[Column]:
    """Each categorical column's levels from all shards' counts."""
    decided = []
    for i, column in enumerate(columns):
        if column.kind == CATEGORICAL:
            if any(column.name in part.too_many_levels for part in parts):
                raise too_many_values(column.name)
            counts = merge_counts([part.levels[column.name] for part in parts])
            column = with_levels(column, counts, any(part.missing[i] for part in parts), config)
        decided.append(column)
    return decided


def too_many_values(name: str) -> DataError:
    return DataError(
        f"column {name!r} has too many distinct values to be categorical; "
        "leave it out of data.features"
    )


def with_levels(column: Column, counts: Counter, has_missing: bool, config: DataConfig) -> Column:
    """A categorical column with its levels: sorted, so the encoding never depends on the
    worker count; capped by data.max_categories; a missing level when imputing."""
    over = config.categories_over_max == "other"
    levels, other = choose_levels(counts, config.max_categories, over)
    if len(levels) > config.max_categories:
        raise DataError(
            f"column {column.name!r} has {len(levels)} categories, over data.max_categories "
            f"{config.max_categories}; raise it, set data.categories_over_max: other, or "
            "leave the column out of data.features"
        )
    if config.missing == "impute" and has_missing:
        levels = (*levels, MISSING_LEVEL)
    return replace(column, levels=levels, other=other)


def scan_levels(
    plan: DataPlan, config: DataConfig, seed: int, rows_at_once: int = SCAN_ROWS
) -> tuple[Column, ...]:
    """The plan's columns with the levels a run would find, for `shardprop plan`: only the
    categorical columns are read (every used one under data.missing: drop, which leaves out
    rows), a slice of rows at a time, here."""
    categorical = [column.name for column in plan.columns if column.kind == CATEGORICAL]
    read = categorical
    if config.missing == "drop":
        read = [*plan.features, plan.label]
    counts = {name: Counter() for name in categorical}
    has_missing = dict.fromkeys(categorical, False)
    for lo in range(0, plan.total_rows if categorical else 0, rows_at_once):
        hi = min(lo + rows_at_once, plan.total_rows)
        table = plan.source.read(read, lo, hi)
        absent = {name: missing(table.column(name)) for name in read}
        train = ~validation_mask(lo, hi, config.validation_fraction, seed)
        if config.missing == "drop":
            train &= ~np.logical_or.reduce(list(absent.values()))
        for name in categorical:
            found, over = level_counts(table.column(name), train)
            if over:
                raise too_many_values(name)
            counts[name].update(found)
            has_missing[name] |= bool(absent[name].any())
    return tuple(
        with_levels(c, counts[c.name], has_missing[c.name], config) if c.kind == CATEGORICAL else c
        for c in plan.columns
    )


def decide(
    parts: Sequence[ShardStats],
    columns: Sequence[Column],
    config: DataConfig,
    left_out: Sequence[tuple[str, str]] = (),
) -> DataSetup:
    """From every shard's description: the checks, the task, the encoding, the statistics."""
    check_values(parts, columns, config)
    val_rows = sum(part.val_rows for part in parts)
    rows = sum(part.rows for part in parts)
    dropped = sum(part.dropped for part in parts)
    if rows == 0:
        raise DataError(
            "the training data has no rows" + (f" ({dropped} dropped)" if dropped else "")
        )
    if config.validation_fraction and val_rows == 0:
        raise DataError(
            f"data.validation_fraction: {config.validation_fraction} of {rows} rows "
            "puts no row in the validation split; raise it or use more rows"
        )
    task, classes, why = decide_task(parts, config)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing spread is refused below
        _, mean, m2 = merge_moments(moments_of(parts))
        var = m2 / rows
    numeric = [column for column in columns if column.kind == NUMERIC]
    if config.missing == "impute":
        fills = iter(mean)
        columns = [replace(c, fill=float(next(fills))) if c.kind == NUMERIC else c for c in columns]
    columns = decide_levels(parts, columns, config)
    notes = []
    if why:
        notes.append(f"data.task auto: {task}, as label {config.label!r} {why}")
    notes.append(describe_columns(columns, left_out))
    if dropped:
        notes.append(f"data.missing drop: {dropped} rows with a missing value left out")
    target = None
    if task == "regression" and config.standardize_target:
        target = (float(mean[-1]), scale_of(var[-1:], mean[-1:], rows, config.label)[0])
    missing_counts = sum(part.missing for part in parts)
    incomplete = frozenset(c.name for c, n in zip(columns, missing_counts, strict=True) if n)
    setup = DataSetup(
        task,
        classes,
        tuple(columns),
        None,
        None,
        target,
        rows,
        val_rows,
        dropped=dropped,
        incomplete=incomplete,
        notes=notes,
    )
    if not config.standardize:
        return setup
    std = scale_of(var[: len(numeric)], mean[: len(numeric)], rows, *[c.name for c in numeric])
    setup.mean, setup.std = np.zeros(setup.width), np.ones(setup.width)
    at = np.cumsum([0, *(column.width for column in columns)])[:-1]
    numeric_at = [row for row, column in zip(at, columns, strict=True) if column.kind == NUMERIC]
    setup.mean[numeric_at], setup.std[numeric_at] = mean[: len(numeric)], std
    return setup


def scale_of(var: np.ndarray, mean: np.ndarray, rows: int, *names: str) -> np.ndarray:
    """The standard deviations to divide by: 1 for a constant column; a spread that overflows
    float64 is refused."""
    std = np.sqrt(var)
    if not np.isfinite(std).all():
        column = names[int(np.argmin(np.isfinite(std)))]
        raise DataError(
            f"column {column!r}: its values spread too far to standardise in float64; "
            "rescale it, or set data.standardize: false"
        )
    return np.where(is_constant(var, mean, rows), 1.0, std)


def moments_of(parts: Sequence[ShardStats]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per block in block order under the exact reduction (the same statistics, to the bit,
    for any worker count), else per shard in rank order."""
    return [moments for part in parts for moments in part.moments]


def describe_columns(columns: Sequence[Column], left_out: Sequence[tuple[str, str]]) -> str:
    """One line: the columns used and how, the network's input width, what is left out."""
    used = ", ".join(column.describe() for column in columns)
    line = f"columns: {used} -> {width_of(columns)} inputs"
    if left_out:
        line += "; left out: " + ", ".join(f"{name} ({why})" for name, why in left_out)
    return line
