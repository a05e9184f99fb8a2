"""What a sweep tries: grids and distributions from `--param` and `sweep.params`."""

import pytest
from ray import tune

from shardprop.service.errors import ConfigError
from shardprop.service.sweep.space import parse_params, parse_spec, search_space


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("0.01,0.1,1", ("grid", [0.01, 0.1, 1])),
        ("[32],[64, 64]", ("grid", [[32], [64, 64]])),  # a comma in brackets is the value's
        ("adam,lbfgs", ("grid", ["adam", "lbfgs"])),
        ([16, 32], ("grid", [16, 32])),  # a YAML list in the sweep: section
        ("loguniform(1e-4, 1)", ("loguniform", [1e-4, 1])),
        ("randint(1,10)", ("randint", [1, 10])),
        ("choice([32],[64])", ("choice", [[32], [64]])),
    ],
)
def test_specs_parse_as_yaml_values(spec, parsed):
    assert parse_spec("key", spec) == parsed


def test_the_space_is_ray_tunes():
    space = search_space({"a": "1,2", "b": "loguniform(1e-3,1)", "c": "choice(x,y)"})
    assert space["a"] == tune.grid_search([1, 2])
    assert isinstance(space["b"], tune.search.sample.Float)
    assert space["b"].lower == 1e-3 and space["b"].upper == 1
    assert space["c"].categories == ["x", "y"]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("lognormal(1,2)", "unknown distribution 'lognormal'"),
        ("loguniform(0,1)", "needs 0 < low < high"),
        ("uniform(2,1)", "uniform needs low < high"),
        ("randint(1)", "randint takes a low and a high number"),
        ("[1", "is not a list of values"),
        ([], "an empty list tries nothing"),
    ],
)
def test_a_bad_spec_names_the_key_and_what_is_wrong(spec, fragment):
    with pytest.raises(ConfigError) as error:
        parse_spec("train.learning_rate", spec)
    assert str(error.value).startswith("sweep train.learning_rate: ")
    assert fragment in str(error.value)


def test_params_flags_need_a_key_and_values():
    assert parse_params(["model.hidden=[8],[16]"]) == {"model.hidden": "[8],[16]"}
    with pytest.raises(ConfigError, match="expected key=values"):
        parse_params(["train.learning_rate"])
