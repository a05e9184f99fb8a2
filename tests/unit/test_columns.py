"""How a table's columns become input rows: one-hot levels, fills for missing numbers, the
levels kept under data.max_categories, and a column's record as the model saves it."""

import json
from collections import Counter

import numpy as np
import pandas
import pyarrow as pa
import pytest

from shardprop.service.config import DataConfig
from shardprop.service.data.prepare import with_levels
from shardprop.workers.data import columns as columns_module
from shardprop.workers.data.columns import (
    CATEGORICAL,
    MISSING_LEVEL,
    NUMERIC,
    Column,
    choose_levels,
    encode,
    level_counts,
    missing,
    numbers,
    one_hot,
)
from shardprop.workers.errors import DataError

NAN = np.nan


def encoded(column: Column, values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """one_hot into a buffer of junk, so that every input it leaves unset shows."""
    out = np.full((column.width, len(values)), 7.0)
    unseen = one_hot(column, values, out)
    return out, unseen


def hot(*codes: int | None, width: int) -> np.ndarray:
    """The expected (width, m) one-hot rows: a code per value, None for an all-zeros row."""
    out = np.zeros((width, len(codes)))
    for row, code in enumerate(codes):
        if code is not None:
            out[code, row] = 1.0
    return out


# one_hot and encode


def test_levels_are_inputs_in_their_sorted_order():
    column = Column("city", CATEGORICAL, ("lima", "oslo", "pune"))
    out, unseen = encoded(column, pa.array(["pune", "lima", "oslo", "lima"]))
    np.testing.assert_array_equal(out, hot(2, 0, 1, 0, width=3))
    assert unseen == 0


def test_a_level_never_seen_encodes_as_all_zeros_and_is_counted():
    column = Column("city", CATEGORICAL, ("lima", "oslo"))
    out, unseen = encoded(column, pa.array(["oslo", "rome", "lima", "kyiv", "rome"]))
    np.testing.assert_array_equal(out, hot(1, None, 0, None, None, width=2))
    assert unseen == 3


def test_with_other_an_unseen_level_goes_to_the_other_input_and_is_not_counted():
    column = Column("city", CATEGORICAL, ("lima", "oslo"), other=True)
    assert column.width == 3
    out, unseen = encoded(column, pa.array(["oslo", "rome", "lima", "kyiv"]))
    np.testing.assert_array_equal(out, hot(1, 2, 0, 2, width=3))
    assert unseen == 0


def test_with_a_missing_level_a_null_goes_to_the_last_input():
    column = Column("city", CATEGORICAL, ("lima", "oslo", MISSING_LEVEL))
    out, unseen = encoded(column, pa.array(["oslo", None, "lima", "rome"]))
    np.testing.assert_array_equal(out, hot(1, 2, 0, None, width=3))
    assert unseen == 1  # rome; the null is not "unseen"


def test_a_missing_level_comes_after_the_other_input():
    column = Column("city", CATEGORICAL, ("lima", MISSING_LEVEL), other=True)
    out, unseen = encoded(column, pa.array([None, "rome", "lima"]))
    np.testing.assert_array_equal(out, hot(2, 1, 0, width=3))
    assert unseen == 0


def test_without_a_missing_level_a_null_makes_its_row_nan():
    column = Column("city", CATEGORICAL, ("lima", "oslo"))
    out, unseen = encoded(column, pa.array(["oslo", None, "lima"]))
    assert np.isnan(out[:, 1]).all()
    np.testing.assert_array_equal(out[:, [0, 2]], hot(1, 0, width=2))
    assert unseen == 0  # missing is not unseen


def test_dictionary_encoded_values_encode_as_their_plain_values():
    column = Column("color", CATEGORICAL, ("blue", "green", "red"))
    plain = pa.array(["red", "blue", None, "green", "pink", "red"])
    # two chunks with different dictionaries, as two Parquet row groups read back
    chunked = pa.chunked_array([plain[:3].dictionary_encode(), plain[3:].dictionary_encode()])
    assert pa.types.is_dictionary(chunked.type)
    out, unseen = encoded(column, chunked)
    expected, expected_unseen = encoded(column, plain)
    np.testing.assert_array_equal(out, expected)
    assert unseen == expected_unseen == 1
    np.testing.assert_array_equal(out[:, [0, 1, 3, 5]], hot(2, 0, 1, 2, width=3))


def test_boolean_columns_have_the_levels_false_then_true():
    column = Column("flag", CATEGORICAL, (False, True))
    out, unseen = encoded(column, pa.array([True, False, True]))
    np.testing.assert_array_equal(out, hot(1, 0, 1, width=2))
    assert unseen == 0
    only_true = Column("flag", CATEGORICAL, (True,))  # training saw one value
    out, unseen = encoded(only_true, pa.array([True, False]))
    np.testing.assert_array_equal(out, hot(0, None, width=1))
    assert unseen == 1


@pytest.mark.parametrize("kind", [pa.int8(), pa.int32(), pa.int64(), pa.uint16()])
def test_integer_levels_match_integer_columns_of_any_width(kind):
    column = Column("grade", CATEGORICAL, (3, 7, 10))
    out, unseen = encoded(column, pa.array([10, 3, 5, 7], kind))
    np.testing.assert_array_equal(out, hot(2, 0, None, 1, width=3))
    assert unseen == 1


@pytest.mark.parametrize(
    ("levels", "values"),
    [
        ((1, 2), pa.array(["1", "two"])),  # text that is not a number
        ((1, 2), pa.array([1.5, 2.0])),  # a fraction is not an integer level
        (("a", "b"), pa.array([[1], [2]])),  # a list is no level at all
    ],
)
def test_values_that_do_not_cast_to_the_levels_type_name_the_column(levels, values):
    column = Column("grade", CATEGORICAL, levels)
    with pytest.raises(DataError, match=r"column 'grade' has type .*levels as"):
        encoded(column, values)


def test_encode_fills_missing_numbers_and_stacks_the_columns_in_order():
    columns = [
        Column("x", NUMERIC, fill=2.5),
        Column("city", CATEGORICAL, ("lima", "oslo", MISSING_LEVEL)),
        Column("z", NUMERIC),
    ]
    table = pa.table(
        {
            "z": pa.array([1.0, NAN, None]),
            "x": pa.array([1.0, NAN, None]),
            "city": pa.array(["oslo", None, "rome"]),
        }
    )
    X, unseen = encode(columns, table)
    expected = np.array(
        [
            [1.0, 2.5, 2.5],  # x: NaN and null both take the fill
            [0.0, 0.0, 0.0],  # city=lima
            [1.0, 0.0, 0.0],  # city=oslo
            [0.0, 1.0, 0.0],  # city=(missing)
            [1.0, NAN, NAN],  # z has no fill: NaN and null stay NaN
        ]
    )
    np.testing.assert_array_equal(X, expected)
    assert unseen == {"city": 1}


def test_encode_takes_numbers_of_any_numeric_type():
    table = pa.table({"n": pa.array([1, None, 3], pa.int16())})
    X, unseen = encode([Column("n", NUMERIC, fill=-1.0)], table)
    np.testing.assert_array_equal(X, [[1.0, -1.0, 3.0]])
    assert unseen == {}


def test_missing_counts_nan_only_in_float_columns():
    np.testing.assert_array_equal(missing(pa.array([1.0, NAN, None])), [False, True, True])
    np.testing.assert_array_equal(missing(pa.array(["NaN", None])), [False, True])
    np.testing.assert_array_equal(numbers(pa.array([1, None], pa.int64())), [1.0, NAN])


# level_counts


def test_level_counts_counts_the_selected_rows_and_leaves_nulls_out():
    values = pa.chunked_array([pa.array(["a", None, "b"]), pa.array(["a", "c", None])])
    rows = np.array([True, True, True, True, False, True])
    assert level_counts(values, rows) == ({"a": 2, "b": 1}, False)


def test_level_counts_sends_nothing_past_the_limit(monkeypatch):
    monkeypatch.setattr(columns_module, "LEVELS_SENT", 2)
    values = pa.chunked_array([pa.array(["a", "b", "c", "a"])])
    assert level_counts(values, np.ones(4, bool)) == ({}, True)
    assert level_counts(values, np.array([True, True, False, True])) == ({"a": 2, "b": 1}, False)


# choose_levels and with_levels: data.max_categories and data.categories_over_max


def test_levels_up_to_the_cap_are_all_kept_sorted():
    counts = Counter({"pune": 1, "lima": 9, "oslo": 4})
    assert choose_levels(counts, 3, other=False) == (("lima", "oslo", "pune"), False)
    assert choose_levels(counts, 3, other=True) == (("lima", "oslo", "pune"), False)


def test_integer_and_boolean_levels_sort_by_value():
    assert choose_levels(Counter({10: 1, 9: 1, 100: 1, -1: 1}), 5, False) == (
        (-1, 9, 10, 100),
        False,
    )
    assert choose_levels(Counter({True: 3, False: 1}), 5, False) == ((False, True), False)


def test_over_the_cap_without_other_every_level_comes_back_for_the_caller_to_refuse():
    counts = Counter(dict.fromkeys("edcba", 1))
    assert choose_levels(counts, 3, other=False) == (tuple("abcde"), False)


def test_other_keeps_the_cap_minus_one_most_frequent_ties_by_sorted_order_result_sorted():
    counts = Counter({"e": 9, "d": 5, "c": 5, "b": 5, "a": 1, "f": 2})
    # e is the most frequent; b, c, d tie at 5: the sorted first of them, b, is kept
    assert choose_levels(counts, 3, other=True) == (("b", "e"), True)
    assert choose_levels(counts, 5, other=True) == (("b", "c", "d", "e"), True)


def test_over_the_cap_is_refused_naming_the_column_its_count_and_the_setting():
    counts = Counter({f"city{i}": i + 1 for i in range(7)})
    config = DataConfig(max_categories=5)
    with pytest.raises(DataError) as error:
        with_levels(Column("city", CATEGORICAL), counts, False, config)
    message = str(error.value)
    assert "'city'" in message and "7 categories" in message
    assert "data.max_categories 5" in message


def test_over_the_cap_with_other_gives_cap_inputs_plus_missing():
    counts = Counter({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    config = DataConfig(max_categories=3, categories_over_max="other", missing="impute")
    column = with_levels(Column("c", CATEGORICAL), counts, True, config)
    assert (column.levels, column.other) == (("d", "e", MISSING_LEVEL), True)
    assert column.width == 4  # d, e, (other), (missing)
    assert column.inputs == ["c=d", "c=e", "c=(other)", "c=(missing)"]


@pytest.mark.parametrize(
    ("missing_mode", "has_missing", "imputed"),
    [("impute", True, True), ("impute", False, False), ("drop", True, False)],
)
def test_a_missing_level_only_when_imputing_a_column_with_missing_values(
    missing_mode, has_missing, imputed
):
    config = DataConfig(missing=missing_mode)
    column = with_levels(Column("c", CATEGORICAL), Counter({"b": 1, "a": 2}), has_missing, config)
    assert column.listed == ("a", "b")
    assert column.imputed is imputed
    assert column.levels == (("a", "b", MISSING_LEVEL) if imputed else ("a", "b"))


# the column's record, as the model saves it


@pytest.mark.parametrize(
    "column",
    [
        Column("x", NUMERIC),
        Column("x", NUMERIC, fill=-0.125),
        Column("city", CATEGORICAL, ("lima", "oslo", MISSING_LEVEL), other=True),
        Column("grade", CATEGORICAL, (1, 2, 30)),
        Column("flag", CATEGORICAL, (False, True, MISSING_LEVEL)),
        Column("empty", CATEGORICAL, (MISSING_LEVEL,)),  # every value was missing
    ],
)
def test_a_column_survives_a_json_round_trip(column):
    back = Column.from_json(json.loads(json.dumps(column.as_json())))
    assert back == column
    assert [type(level) for level in back.levels] == [type(level) for level in column.levels]
    assert back.inputs == column.inputs


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"kind": "numeric"}, "a column entry is not valid"),
        ({"name": "x", "kind": "numeric", "fill": "many"}, "a column entry is not valid"),
        ({"name": "x", "kind": "ordinal"}, "column 'x': unknown kind 'ordinal'"),
    ],
)
def test_a_bad_column_record_is_a_data_error(record, message):
    with pytest.raises(DataError, match=message):
        Column.from_json(record)


def test_input_names_one_per_input_row():
    assert Column("x").inputs == ["x"]
    column = Column("c", CATEGORICAL, (1, 2, MISSING_LEVEL))
    assert column.inputs == ["c=1", "c=2", "c=(missing)"]
    assert column.listed == (1, 2)
    assert len(column.inputs) == column.width
    assert column.describe() == "c (categorical, 2 levels + missing)"
    assert Column("x").describe() == "x (numeric)"


def test_a_pandas_frame_as_the_served_model_gets_it_encodes_as_the_table_does():
    columns = [
        Column("grade", CATEGORICAL, (1, 3, MISSING_LEVEL)),  # pandas holds it as float + NaN
        Column("city", CATEGORICAL, ("lima", "oslo", MISSING_LEVEL)),  # a pandas category
        Column("x", NUMERIC, fill=0.5),
    ]
    frame = pandas.DataFrame(
        {
            "x": [1.0, None, 2.0],
            "grade": [1, None, 3],
            "city": pandas.Series(["oslo", None, "lima"], dtype="category"),
        }
    )
    table = pa.table(
        {
            "grade": pa.array([1, None, 3]),
            "city": pa.array(["oslo", None, "lima"]),
            "x": pa.array([1.0, None, 2.0]),
        }
    )
    served, unseen = encode(columns, pa.Table.from_pandas(frame, preserve_index=False))
    np.testing.assert_array_equal(served, encode(columns, table)[0])
    np.testing.assert_array_equal(served[:3], hot(0, 2, 1, width=3))
    assert unseen == {}
