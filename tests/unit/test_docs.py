"""docs/config.md documents every config key: each key of the config model has a row.

A key is a dotted path to a field (`train.learning_rate`). A row names its keys in its first
cell, one or several (`| \\`cluster.min_workers\\`, \\`cluster.max_workers\\` |`). A key whose
value is a mapping of its own (`data.synthetic`) may have one row that names each field.
"""

import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from shardprop.service.config import Config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DOC = ROOT / "docs" / "config.md"

FIRST_CELL = re.compile(r"^\|((?:[^|\\]|\\.)*)\|")  # up to the first unescaped |
DOTTED_KEY = re.compile(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)`")


def section_of(annotation: object) -> type[BaseModel] | None:
    """The pydantic model a field holds (`X | None` unwrapped), or None for a plain value."""
    for arg in getattr(annotation, "__args__", (annotation,)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the config, down to the fields of nested models."""
    for name, field in model.model_fields.items():
        nested = section_of(field.annotation)
        if nested is None:
            yield prefix + name
        else:
            yield from config_keys(nested, f"{prefix}{name}.")


def documented_rows(text: str) -> dict[str, str]:
    """Each key named in a table row's first cell, with its whole row."""
    rows = {}
    for line in text.splitlines():
        cell = FIRST_CELL.match(line)
        if cell:
            for key in DOTTED_KEY.findall(cell.group(1)):
                rows[key] = line
    return rows


def is_documented(key: str, rows: dict[str, str]) -> bool:
    if key in rows:
        return True
    parent, _, field = key.rpartition(".")
    # a mapping documented in one row, which names this field
    return parent in rows and re.search(rf"\b{field}\b", rows[parent]) is not None


def test_the_walk_finds_nested_and_jointly_documented_keys():
    keys = set(config_keys())
    assert {"train.learning_rate", "data.synthetic.rows", "cluster.max_workers"} <= keys
    rows = documented_rows("| `a.b`, `a.c` | 1 | x |\n| `a.d` | `{e, f}` | y |\n| no | `a.g` |")
    assert set(rows) == {"a.b", "a.c", "a.d"}
    assert is_documented("a.d.e", rows) and not is_documented("a.d.h", rows)
    assert not is_documented("a.g", rows)


def test_every_config_key_has_a_row_in_docs_config_md():
    rows = documented_rows(CONFIG_DOC.read_text())
    missing = [key for key in config_keys() if not is_documented(key, rows)]
    assert not missing, f"keys with no row in docs/config.md: {missing}"


def test_the_readme_config_rows_are_rows_of_docs_config_md():
    readme = documented_rows((ROOT / "README.md").read_text())
    full = documented_rows(CONFIG_DOC.read_text())
    assert readme, "README.md has no config table"
    for key, row in readme.items():
        # README's links start at the top of the repository, docs/config.md's beside it
        assert row.replace("](docs/", "](").replace("[docs/", "[") == full.get(key), key
