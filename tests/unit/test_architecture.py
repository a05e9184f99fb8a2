"""The layout's import rules (docs/architecture.md), read from the source: each part imports
only the parts below it, so there is no cycle and benchmark code is never imported by the
product."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a part may import the parts listed after it, never one listed before it
LAYERS = [
    "service.cli service.api",  # the command and the Python API: neither imports the other
    "service.bench service.sweep",  # side by side: benchmarks, and sweeps of trainings
    "service.training service.scoring",  # side by side: training, and predicting after it
    "service.cluster service.tracking",  # side by side: neither imports the other
    "service.data",
    "service.config",
    "service.errors service.shipped_code",
    "workers",
]
RANK = {part: rank for rank, layer in enumerate(LAYERS) for part in layer.split()}


def part_of(module: str) -> str | None:
    """`shardprop.service.training.run` -> "service.training"; None for another package and
    for `shardprop.service` itself (a docstring, nothing to import)."""
    names = module.removesuffix(".__init__").split(".")
    if names[0] != "shardprop" or len(names) < 2 or names == ["shardprop", "service"]:
        return None
    if names[1] == "workers":
        return "workers"
    return f"service.{names[2]}"


def imports() -> list[tuple[str, str, str]]:
    """(file, importing part, imported part) for every shardprop import in the product."""
    found = []
    for folder in ("service", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = "shardprop." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
            source = part_of(module)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    targets = [node.module]
                elif isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    continue
                for target in targets:
                    part = part_of(target)
                    if part and part != source:
                        found.append((str(path.relative_to(ROOT)), source, part))
    return found


def test_every_part_of_the_product_is_in_a_layer():
    parts = {source for _, source, _ in imports()} | {part for *_, part in imports()}
    assert parts - {None, "service.__main__"} <= set(RANK)


def test_each_part_imports_only_the_parts_below_it():
    upward = [
        f"{path}: {source} imports {part}"
        for path, source, part in imports()
        if source in RANK and RANK[part] <= RANK[source]
    ]
    assert not upward, "\n".join(upward)


def test_workers_never_import_the_coordinator():
    assert not [path for path, source, part in imports() if source == "workers" and part != source]
