"""What a sweep tries: each config key's values, as Ray Tune's search space.

A key's spec is a grid, `0.01,0.1,1` or `[32],[64,64]` (YAML values, every one tried), or a
distribution drawn once per sample: `loguniform(1e-4,1)`, `uniform(a,b)`, `randint(a,b)`,
`choice(v1,v2,...)`. In the `sweep:` section a YAML list is a grid too.
"""

import re
from typing import Any

import yaml

from shardprop.service.errors import ConfigError

DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None}  # name: arguments
CALL = re.compile(r"^\s*(\w+)\((.*)\)\s*$")


def values(text: str, what: str) -> list[Any]:
    """`v1,v2,...` as YAML values; a comma inside brackets belongs to its value."""
    try:
        parsed = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError:
        parsed = None
    if not isinstance(parsed, list) or not parsed:
        raise ConfigError(f"{what}: {text!r} is not a list of values, e.g. 0.01,0.1,1")
    return parsed


def number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as text: a number where the text is one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_spec(key: str, spec: str | list[Any]) -> tuple[str, list[Any]]:
    """("grid", values) or (distribution, arguments), checked."""
    what = f"sweep {key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{what}: an empty list tries nothing")
        return "grid", spec
    call = CALL.match(str(spec))
    if call is None:
        return "grid", values(str(spec), what)
    name, arguments = call.group(1), values(call.group(2), what)
    if name not in DISTRIBUTIONS:
        known = ", ".join(DISTRIBUTIONS)
        raise ConfigError(f"{what}: unknown distribution {name!r} (one of {known})")
    count = DISTRIBUTIONS[name]
    if count is not None:
        arguments = [number(argument) for argument in arguments]
        if len(arguments) != count or not all(isinstance(a, int | float) for a in arguments):
            raise ConfigError(f"{what}: {name} takes a low and a high number, e.g. {name}(1,10)")
        low, high = arguments
        if not low < high or (name == "loguniform" and low <= 0):
            raise ConfigError(
                f"{what}: {name}({low}, {high}) needs 0 < low < high"
                if name == "loguniform"
                else f"{what}: {name} needs low < high"
            )
    return name, arguments


def one_value(key: str, spec: str | list[Any]) -> Any:
    """A value the key may take (the first of a grid, a distribution's low end), to check
    that the key is a config key before the sweep starts."""
    return parse_spec(key, spec)[1][0]


def parse_params(assignments: list[str]) -> dict[str, str]:
    """`--param key=spec` flags as {key: spec}."""
    params = {}
    for assignment in assignments:
        key, sep, spec = assignment.partition("=")
        if not sep or not key.strip() or not spec.strip():
            raise ConfigError(
                f"--param {assignment!r}: expected key=values, e.g. train.learning_rate=0.01,0.1"
            )
        params[key.strip()] = spec
    return params


def search_space(params: dict[str, str | list[Any]]) -> dict[str, Any]:
    """Ray Tune's param_space: the keys flat, as dotted config keys."""
    from ray import tune

    space = {}
    for key, spec in params.items():
        name, arguments = parse_spec(key, spec)
        if name == "grid":
            space[key] = tune.grid_search(arguments)
        elif name == "choice":
            space[key] = tune.choice(arguments)
        else:
            space[key] = getattr(tune, name)(*arguments)
    return space
