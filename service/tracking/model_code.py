"""The file MLflow logs as the model ("models from code").

Loading the model runs this file instead of unpickling an object. The model is
serving.ShardpropModel, shipped beside this file through code_paths: a partial shardprop (the
workers' math and the pyfunc class) in code/shardprop, which MLflow puts first on sys.path.
Imported from there, `shardprop.service` would be that partial copy for the rest of the
process, and the rest of an installed shardprop (training, the CLI) would no longer import.
So when the installed shardprop holds the same code, it is the one imported; the shipped
copy serves where shardprop is not installed, or is another version.
"""

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow.models

CODE = Path(__file__).with_name("code")  # the model's code_paths, as MLflow lays them out
PACKAGES = ("service", "workers")
SERVING = "shardprop.service.tracking.serving"


def is_shipped_code(entry: str) -> bool:
    return os.path.realpath(entry or ".") == os.path.realpath(CODE)


@contextmanager
def without_shipped_code() -> Iterator[None]:
    """sys.path without the model's code folder for the block, then as MLflow left it."""
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if not is_shipped_code(entry)]
    try:
        yield
    finally:
        sys.path[:] = saved


def installed_folder(package: str) -> Path | None:
    """Where shardprop.<package> imports from without the model's copy; None if nowhere."""
    try:
        spec = importlib.util.find_spec(f"shardprop.{package}")
    except ModuleNotFoundError:  # no shardprop at all
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def same_as_installed() -> bool:
    """Every file shipped with the model is, byte for byte, the installed one."""
    shipped = CODE / "shardprop"
    for package in PACKAGES:
        installed = installed_folder(package)
        if installed is None:
            return False
        for path in (shipped / package).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            twin = installed / path.relative_to(shipped / package)
            if not twin.is_file() or twin.read_bytes() != path.read_bytes():
                return False
    return True


if "shardprop.service" not in sys.modules:  # else the process has chosen already
    with without_shipped_code():
        if same_as_installed():
            importlib.import_module(SERVING)

from shardprop.service.tracking.serving import ShardpropModel  # noqa: E402

mlflow.models.set_model(ShardpropModel())
