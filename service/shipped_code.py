"""This version of shardprop's code as a folder that other processes import under the same
names: Ray nodes through runtime_env `py_modules`, the MLflow model through `code_paths`."""

import shutil
from collections.abc import Iterable
from pathlib import Path

import shardprop.service as service

# the folder that holds service/ and workers/: the repository, or site-packages/shardprop
BASE = Path(service.__file__).parent.parent
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def stage(dest: Path, parts: Iterable[str]) -> Path:
    """Copy each part ("workers", "service/tracking/serving.py", ...) into `dest/shardprop/`
    with the `__init__.py` of every package above it; return `dest/shardprop`, the folder to
    ship. It has no `__init__.py`: `shardprop` is a namespace package, as when installed."""
    root = dest / "shardprop"
    for part in parts:
        path = Path(part)
        for package in reversed(path.parents[:-1]):
            (root / package).mkdir(parents=True, exist_ok=True)
            shutil.copy(BASE / package / "__init__.py", root / package / "__init__.py")
        if (BASE / path).is_dir():
            shutil.copytree(BASE / path, root / path, ignore=SKIP, dirs_exist_ok=True)
        else:
            shutil.copy(BASE / path, root / path)
    return root
