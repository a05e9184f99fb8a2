"""Which columns of a table feed the network, and how each one becomes input rows.

A numeric column is one input. A categorical column (strings, dictionary-encoded, booleans,
and integers the user lists in data.categorical) is one-hot: one input per level, in sorted
order, then one for "other" values when asked, and the "missing" level last. The workers
and the served model encode with the same functions, so a prediction sees what training saw.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardprop.workers.errors import DataError

NUMERIC, CATEGORICAL = "numeric", "categorical"
MISSING_LEVEL = None  # the level of a missing value under data.missing: impute; sorted last
OTHER = "(other)"  # how the "other" input is named
LEVELS_SENT = 100_000  # a shard with more distinct values than this holds ids, not categories
# Arrow types whose every value float32 holds exactly
FLOAT32_EXACT = ("float", "halffloat", "int8", "int16", "uint8", "uint16", "bool")


@dataclass(frozen=True)
class Column:
    """One used column and its encoding; levels and fill are set once the data is read."""

    name: str
    kind: str = NUMERIC
    levels: tuple = ()  # categorical: sorted levels, then MISSING_LEVEL if imputed
    other: bool = False  # categorical: one more input for any level not in `levels`
    fill: float | None = None  # numeric: the training mean a missing value is replaced by

    @property
    def width(self) -> int:
        return 1 if self.kind == NUMERIC else len(self.levels) + self.other

    @property
    def inputs(self) -> list[str]:
        """The network's input names, one per input row."""
        if self.kind == NUMERIC:
            return [self.name]
        names = [f"{self.name}={'(missing)' if v is None else v}" for v in self.listed]
        others = [f"{self.name}={OTHER}"] if self.other else []
        missing = [f"{self.name}=(missing)"] if self.imputed else []
        return names + others + missing

    @property
    def listed(self) -> tuple:
        """The levels seen in training, without the missing level."""
        return self.levels[:-1] if self.imputed else self.levels

    @property
    def imputed(self) -> bool:
        return bool(self.levels) and self.levels[-1] is MISSING_LEVEL

    def describe(self) -> str:
        if self.kind == NUMERIC:
            return f"{self.name} (numeric)"
        extra = (" + other" if self.other else "") + (" + missing" if self.imputed else "")
        return f"{self.name} (categorical, {len(self.listed)} levels{extra})"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "levels": list(self.levels),
            "other": self.other,
            "fill": self.fill,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Column":
        try:
            column = cls(
                str(data["name"]),
                str(data["kind"]),
                tuple(data.get("levels") or ()),
                bool(data.get("other", False)),
                None if data.get("fill") is None else float(data["fill"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"a column entry is not valid: {data!r} ({error})") from None
        if column.kind not in (NUMERIC, CATEGORICAL):
            raise DataError(f"column {column.name!r}: unknown kind {column.kind!r}")
        return column


def held_as(kind: pa.DataType, dtype: str) -> np.dtype:
    """The dtype a worker holds a numeric column in until it is standardised: the training
    dtype where that holds every value exactly, else float64 (a column whose spread is
    small beside its values keeps its resolution only if standardised first)."""
    named = np.dtype(dtype)  # float64 or float32
    return named if named == np.float64 or str(kind) in FLOAT32_EXACT else np.dtype(np.float64)


def width_of(columns: Sequence[Column]) -> int:
    return sum(column.width for column in columns)


def is_categorical_type(kind: pa.DataType) -> bool:
    """What is one-hot encoded without being asked: text, dictionaries and booleans."""
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_dictionary(kind)
        or pa.types.is_boolean(kind)
    )


def plain(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """The values of a dictionary-encoded column, decoded; any other column as it is."""
    if pa.types.is_dictionary(column.type):
        return pc.cast(column, column.type.value_type)
    return column


def missing(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a value is missing: null, or NaN in a float column."""
    nulls = column.is_null(nan_is_null=pa.types.is_floating(column.type))
    return nulls.to_numpy(zero_copy_only=False)


def numbers(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), np.float64)


def level_counts(column: pa.ChunkedArray, rows: np.ndarray) -> tuple[dict, bool]:
    """How often each level occurs among the selected rows (nulls left out), and whether there
    are too many distinct values to send (more than LEVELS_SENT: then none are sent)."""
    values = plain(column).filter(pa.array(rows))
    counted = pc.value_counts(pc.drop_null(values))
    if len(counted) > LEVELS_SENT:
        return {}, True
    levels = counted.field("values").to_pylist()
    return dict(zip(levels, counted.field("counts").to_pylist(), strict=True)), False


def merge_counts(parts: Sequence[dict]) -> Counter:
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


def sort_key(level: Any) -> tuple:
    """Levels sort by value; a mixed bag (never one Arrow column) sorts by type name first."""
    return (type(level).__name__, level)


def choose_levels(counts: Counter, cap: int, other: bool) -> tuple[tuple, bool]:
    """The levels kept, sorted, and whether an "other" input takes the rest: with `other`,
    the cap - 1 most frequent (ties by sorted order) when there are more than `cap`."""
    levels = sorted(counts, key=sort_key)
    if len(levels) <= cap or not other:
        return tuple(levels), False
    by_count = sorted(levels, key=lambda level: -counts[level])  # stable: ties stay sorted
    return tuple(sorted(by_count[: cap - 1], key=sort_key)), True


def value_type(levels: Sequence) -> pa.DataType:
    kinds = {type(level) for level in levels if level is not None}
    if kinds == {bool}:
        return pa.bool_()
    if kinds and kinds <= {int}:
        return pa.int64()
    return pa.string()


def one_hot(column: Column, values: pa.ChunkedArray | pa.Array, out: np.ndarray) -> int:
    """Write the one-hot rows of a categorical column into `out` (width, m); returns how many
    present values match no input (not seen in training): those rows are all zeros. A
    missing value without a missing level makes its row NaN."""
    out[...] = 0
    listed = column.listed
    kind = value_type(listed)
    values = plain(values)
    if values.type != kind:
        try:
            values = pc.cast(values, kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(
                f"column {column.name!r} has type {values.type}; the model reads its levels "
                f"as {kind}"
            ) from None
    code = pc.index_in(values, value_set=pa.array(listed, kind))
    code = np.asarray(pc.fill_null(code, -1).to_numpy(zero_copy_only=False), np.int64)
    absent = missing(values)
    unseen = (code < 0) & ~absent
    if column.other:
        code[unseen] = len(listed)
    if column.imputed:
        code[absent] = column.width - 1
    else:  # as a missing number does: the row predicts NaN
        out[:, absent] = np.nan
    rows = np.flatnonzero(code >= 0)
    out[code[rows], rows] = 1.0
    return 0 if column.other else int(np.count_nonzero(unseen))


def encode(columns: Sequence[Column], table: pa.Table) -> tuple[np.ndarray, dict[str, int]]:
    """The input rows X (n0, m) of a table's raw columns, and the count of values per column
    never seen in training. Missing numeric values are filled where the column has a fill,
    NaN otherwise (the caller refuses or predicts NaN)."""
    X = np.empty((width_of(columns), table.num_rows), np.float64)
    unseen = {}
    row = 0
    for column in columns:
        rows = X[row : row + column.width]
        values = table.column(column.name)
        if column.kind == NUMERIC:
            rows[0] = numbers(values)
            if column.fill is not None:
                rows[0, np.isnan(rows[0])] = column.fill
        elif count := one_hot(column, values, rows):
            unseen[column.name] = count
        row += column.width
    return X, unseen


def inputs(
    columns: Sequence[Column], mean: np.ndarray | None, scale: np.ndarray | None, table: pa.Table
) -> tuple[np.ndarray, dict[str, int]]:
    """The network's inputs (n0, m) from a table of raw columns, as the served model computes
    them: encoded, then standardised by `mean` and `scale` ((n0, 1) each; None: as they are);
    and the count of values per column never seen in training."""
    X, unseen = encode(columns, table)
    if mean is not None:
        X -= mean
    if scale is not None:
        X /= scale
    return X, unseen
