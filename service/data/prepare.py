"""From the shards' statistics to a training setup: checks, task, classes, standardisation.

Each worker describes its own rows; these functions reduce those descriptions in rank order,
so the checks cover every row and the statistics are those of the whole training set.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shardprop.service.config import DataConfig
from shardprop.service.errors import DataError
from shardprop.workers.shard import MAX_LABEL_VALUES, ShardStats


@dataclass
class DataSetup:
    task: str  # binary | multiclass | regression
    classes: list | None  # sorted original labels (classification)
    mean: np.ndarray | None  # per feature, None without standardisation
    std: np.ndarray | None
    rows: int  # training rows
    val_rows: int

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.task == "multiclass" else 1


def merge_moments(
    parts: Sequence[tuple[int, np.ndarray, np.ndarray]],
) -> tuple[int, np.ndarray, np.ndarray]:
    """Rows, mean and sum of squared deviations of all rows, from each part's (rows, mean,
    m2), in the given order (Chan et al.'s pairwise update).

    Merging per-part means and deviations keeps the precision that raw sums of squares
    would lose on features with a large offset.
    """
    rows, mean, m2 = 0, np.zeros_like(parts[0][1]), np.zeros_like(parts[0][2])
    for part_rows, part_mean, part_m2 in parts:
        if part_rows == 0:
            continue
        total = rows + part_rows
        delta = part_mean - mean
        mean = mean + delta * (part_rows / total)
        m2 = m2 + part_m2 + delta**2 * (rows * part_rows / total)
        rows = total
    return rows, mean, m2


def moments_of(parts: Sequence[ShardStats]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per block in block order when the shards are whole blocks (the exact reduction: the
    same statistics, to the bit, for any worker count), else per shard in rank order."""
    if all(part.blocks is not None for part in parts):
        return [block for part in parts for block in part.blocks]
    return [(part.rows, part.mean, part.m2) for part in parts]


def check_finite(parts: Sequence[ShardStats], features: Sequence[str], label: str) -> None:
    counts = sum(part.nonfinite for part in parts)
    for i, (column, count) in enumerate(zip(features, counts, strict=True)):
        if count:
            first = next(part.first_bad[column] for part in parts if part.nonfinite[i])
            raise DataError(
                f"column {column!r} has {count} NaN, inf or null values (first at {first}); "
                "clean or drop them before training"
            )
    label_nulls = sum(part.label_nulls for part in parts)
    if label_nulls:
        first = next(part.first_bad[label] for part in parts if part.label_nulls)
        raise DataError(
            f"label column {label!r} has {label_nulls} null or NaN values (first at {first}); "
            "clean or drop those rows before training"
        )


def decide_task(parts: Sequence[ShardStats], config: DataConfig) -> tuple[str, list | None]:
    """The task and, for classification, the sorted classes (labels of any type)."""
    kind = parts[0].label_kind
    fractional = any(part.label_fractional for part in parts)
    values = sorted(set().union(*(part.label_values for part in parts)))
    many = len(values) > MAX_LABEL_VALUES
    count = f"more than {MAX_LABEL_VALUES}" if many else str(len(values))
    where = f"label column {config.label!r}"
    task = config.task
    if task == "auto":
        if kind != "string" and (fractional or many):
            task = "regression"
        else:
            task = "binary" if len(values) <= 2 else "multiclass"
    if task == "regression":
        if kind == "string":
            raise DataError(f"{where} holds strings; data.task regression needs numbers")
        return task, None
    if fractional:
        raise DataError(f"{where} has fractional values; data.task {task} needs class labels")
    if many:
        raise DataError(f"{where} has {count} distinct values: too many for data.task {task}")
    if len(values) < 2 or (task == "binary" and len(values) != 2):
        need = "exactly two" if task == "binary" else "at least two"
        raise DataError(f"{where} has {count} distinct values; data.task {task} needs {need}")
    return task, values


def decide(parts: Sequence[ShardStats], features: Sequence[str], config: DataConfig) -> DataSetup:
    check_finite(parts, features, config.label)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing spread is refused below
        rows, mean, m2 = merge_moments(moments_of(parts))
    val_rows = sum(part.val_rows for part in parts)
    if rows == 0:
        raise DataError("the training data has no rows")
    if config.validation_fraction and val_rows == 0:
        raise DataError(
            f"data.validation_fraction: {config.validation_fraction} of {rows} rows "
            "puts no row in the validation split; raise it or use more rows"
        )
    task, classes = decide_task(parts, config)
    if not config.standardize:
        return DataSetup(task, classes, None, None, rows, val_rows)
    std = np.sqrt(m2 / rows)
    if not np.isfinite(std).all():
        column = features[int(np.argmin(np.isfinite(std)))]
        raise DataError(
            f"column {column!r}: its values spread too far to standardise in float64; "
            "rescale it, or set data.standardize: false"
        )
    std[std == 0] = 1.0  # a constant column stays constant (zero) rather than dividing by 0
    return DataSetup(task, classes, mean, std, rows, val_rows)
