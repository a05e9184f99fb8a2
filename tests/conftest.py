"""Shared fixtures: one real local Ray runtime per test session, real MLflow stores on disk; each
test marked with its level, from its folder."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
LEVELS = ("unit", "integration", "cluster", "speed")
SLOW_LEVELS = ("cluster", "speed")  # left out of the day-to-day `pytest -m "not slow"`


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue
        level = item.path.relative_to(TESTS).parts[0]
        if level not in LEVELS:
            raise pytest.UsageError(
                f"{item.path}: a test module lives in one of tests/{{{','.join(LEVELS)}}}"
            )
        item.add_marker(level)
        if level in SLOW_LEVELS:
            item.add_marker("slow")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """tests/speed times ratios and tests/cluster starts `ray start` nodes and servers: each
    runs alone on the machine, never beside another test of `pytest -n`."""
    if os.environ.get("PYTEST_XDIST_WORKER") and {"speed", "cluster"} & {
        mark.name for mark in item.iter_markers()
    }:
        pytest.fail(
            'runs alone: select tests/speed and tests/cluster with -m "speed or cluster" and'
            " no -n (the README's test command)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def ray_session():
    """A real Ray runtime started on this machine, shared by the tests that need one.

    6 logical CPUs on a 2-core machine, so that 5 single-CPU workers can be scheduled; the
    dashboard on loopback, because Ray's state API (which actors are alive) is served by it.
    """
    import ray

    context = ray.init(
        num_cpus=6,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level="WARNING",
    )
    ray.dashboard_address = f"http://{context.dashboard_url}"  # for ray.util.state calls
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def new_store(tmp_path_factory):
    """new_store(folder) -> the URI of a new, empty sqlite MLflow store in folder/mlflow.db.

    MLflow makes a new store's schema by running its migrations, seconds each time: they
    run once here, and each new store is a copy of that empty one, the very same tables.
    A test of what the product does with no store at all names a path of its own."""
    from mlflow import MlflowClient

    empty = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{empty}").search_experiments()

    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return make


@pytest.fixture
def tracking_uri(tmp_path, new_store):
    """A fresh sqlite MLflow store for one test."""
    return new_store(tmp_path)


@pytest.fixture(autouse=True)
def _no_stray_mlflow_env(monkeypatch):
    # a developer's MLFLOW_TRACKING_URI must not redirect the tests' runs
    for name in list(os.environ):
        if name.startswith("MLFLOW_TRACKING"):
            monkeypatch.delenv(name)


@pytest.fixture
def mount(tmp_path):
    """mount("name", "ro") -> a folder with a tmpfs of those options on it, taken off after
    the test. Root alone may mount: elsewhere the test is skipped, saying so."""
    mounted: list[Path] = []

    def mount_tmpfs(name: str, options: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"a real read-only or full mount needs `mount` (root): {done.stderr}")
        mounted.append(folder)
        return folder

    yield mount_tmpfs
    for folder in reversed(mounted):
        # lazily: a store's open database keeps the mount busy until its process ends
        subprocess.run(["umount", "--lazy", str(folder)], check=True)
