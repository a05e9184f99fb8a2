"""`shardprop verify` holds a build to docs/exactness.md: it passes on a correct build, and
names the check that fails when the math or the reduction is deliberately broken.

Real Ray actors (a local runtime), a real Parquet file, a real MLflow store read back.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.config import load_config
from shardprop.service.data.plan import write_table
from shardprop.service.training import run as training_run
from shardprop.service.training.reduce import reduce_sums
from shardprop.service.training.verify import verify
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from shardprop.workers.network.activations import DERIVATIVES
from shardprop.workers.reduction.sums import ShardSums

STEPS = 5


@pytest.fixture(scope="module")
def moons_1001(tmp_path_factory):
    """1,001 rows: split over 2 or 3 workers, the shards differ in size."""
    folder = tmp_path_factory.mktemp("data")
    table = generate(SyntheticSpec("moons", rows=1001, noise=0.3, seed=7), 0, 1001)
    return write_table(table, folder / "moons.parquet", row_group_rows=128)


@pytest.fixture
def config_file(tmp_path, moons_1001):
    path = tmp_path / "verify.yaml"
    path.write_text(
        f"data: {{path: {moons_1001}}}\n"
        "model: {hidden: [16, 8], activation: tanh}\n"
        "train: {l2: 0.001}\n"
    )
    return path


def shardprop(*args, cwd):
    # the console script pip installed beside this interpreter: what a user runs
    command = [str(Path(sys.executable).parent / "shardprop"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def invoke(*args):
    result = CliRunner().invoke(app, ["verify", *map(str, args)])
    return result.exit_code, result.output


def failure_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("verify failed:")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.slow
def test_verify_passes_on_a_correct_build_and_logs_its_own_mlflow_run(
    new_store, tmp_path, config_file
):
    uri = new_store(tmp_path)
    result = shardprop(
        "verify",
        config_file,
        "--workers",
        "1,2,3",
        "--steps",
        STEPS,
        "--tracking-uri",
        uri,
        "--experiment",
        "checks",
        "--json",
        tmp_path / "verify.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify failed" not in result.stderr
    for row in ("finite differences", "distributed gradient", f"weights after {STEPS} steps"):
        assert row in result.stdout
    assert "bitwise distributed gradient" in result.stdout  # train.reduction: exact, the default

    written = json.loads((tmp_path / "verify.json").read_text())
    assert written["result"] == "pass" and written["failures"] == []
    client = MlflowClient(uri)
    run = client.get_run(written["run_id"])
    assert run.info.run_name == "verify"
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "checks"
    assert run.data.tags["verify.result"] == "pass"
    params = run.data.params
    assert params["model.hidden"] == "[16, 8]"  # the config, flattened as training runs log it
    assert params["verify.workers"] == "[1, 2, 3]"
    assert params["verify.steps"] == str(STEPS)
    metrics = run.data.metrics
    assert metrics["finite_differences.max_rel"] <= 1e-5
    for k in (1, 2, 3):
        assert metrics[f"gradient.workers_{k}.max_rel"] <= 1e-10
        assert metrics[f"weights.workers_{k}.max_rel"] <= 1e-8
    assert metrics["gradient.workers_1.max_abs"] == 0.0  # one shard: the very same sums
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "verify.json")).read_text())
    assert logged["result"] == "pass"
    assert len(logged["checks"]) == 1 + 3 + 3 + 6  # fd, gradient x3, weights x3, bitwise x6
    assert all(c["status"] == "pass" for c in logged["checks"]), logged["checks"]


def mean_of_worker_means(parts):
    """The bug docs/exactness.md warns about: each worker's mean, then the mean of those, which is
    not the full-batch mean once the shards differ in size. As sums over all rows, so that
    the trainer's division by the total rows leaves the mean of means."""
    total = reduce_sums(parts)
    total.grad = np.mean([part.grad / part.rows for part in parts], axis=0) * total.rows
    total.loss = float(np.mean([part.loss / part.rows for part in parts])) * total.rows
    return total


@pytest.mark.slow
def test_averaging_per_worker_means_on_uneven_shards_fails_and_names_the_check(
    ray_session, tmp_path, config_file, tracking_uri, monkeypatch
):
    monkeypatch.setattr(training_run, "reduce_sums", mean_of_worker_means)
    rank_order = ("--set", "train.reduction=rank_order")  # each worker's rows in one sum
    code, output = invoke(
        config_file,
        "--workers",
        "2,3",
        "--steps",
        STEPS,
        "--tracking-uri",
        tracking_uri,
        *rank_order,
    )
    assert code == 1, output
    line = failure_line(output)
    for k in (2, 3):  # 501 + 500 and 334 + 334 + 333 rows
        assert f"distributed gradient, {k} workers: max relative deviation" in line
        assert f"weights after {STEPS} steps, {k} workers" in line
    assert "finite differences" not in line  # in-process, one shard: a mean of one mean
    assert "Traceback" not in output
    (run,) = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("shardprop").experiment_id]
    )
    assert run.data.tags["verify.result"] == "fail"
    assert run.data.metrics["gradient.workers_2.max_rel"] > 1e-10


def test_a_wrong_backward_rule_fails_the_finite_difference_check(
    tmp_path, config_file, monkeypatch
):
    """tanh's derivative 1 % too steep: the distributed runs would agree with the in-process
    one (same wrong math everywhere); only finite differences can tell."""

    def steep_tanh_derivative(A, dA):
        dA *= 1.01 * (1 - A * A)

    monkeypatch.setitem(DERIVATIVES, "tanh", steep_tanh_derivative)
    config = load_config(config_file, [], {"tracking.enabled": False})
    report = verify(config, counts=(), steps=STEPS)
    assert not report.passed
    (failure,) = report.failures()
    assert failure.startswith("finite differences: max relative deviation")
    assert report.checks[0].max_rel > 1e-3

    code, output = invoke(config_file, "--workers", "", "--no-tracking")
    assert code == 1
    assert failure_line(output).startswith("verify failed: finite differences:")


def test_the_correct_gradient_passes_finite_differences_in_float64_for_a_float32_config(
    config_file,
):
    config = load_config(
        config_file, ["model.dtype=float32", "model.activation=relu"], {"tracking.enabled": False}
    )
    report = verify(config, counts=(), steps=STEPS, fd_params=50)
    (check,) = report.checks
    assert check.name == "finite differences" and check.status == "pass", check
    assert check.max_rel <= 1e-5
    assert report.dtype == "float32"


@pytest.mark.slow
def subtrees_in_arrival_order(parts):
    """A broken exact reduction: the workers' subtrees added one after the other rather
    than along the block tree. Right to rounding, but the grouping follows the split."""
    nodes = [sums for part in parts for _, sums in sorted(part.nodes.items())]
    total = nodes[0]
    for sums in nodes[1:]:
        total = total + sums
    return ShardSums(total.grad, total.loss, total.rows, total.correct, tallies=total.tallies)


@pytest.mark.slow
def test_an_exact_reduction_off_its_tree_fails_the_bitwise_check_alone(
    ray_session, tmp_path, config_file, monkeypatch
):
    monkeypatch.setattr(training_run, "reduce_sums", subtrees_in_arrival_order)
    code, output = invoke(config_file, "--workers", "2,3", "--steps", STEPS, "--no-tracking")
    assert code == 1, output
    line = failure_line(output)
    # 2 workers hold 4 blocks each, one subtree apiece: added in order, that is the tree
    assert "bitwise distributed gradient, 3 workers" in line
    assert "max relative deviation" not in line  # equal to rounding: only the bits differ


def test_exact_reduction_gives_bitwise_identical_gradient_and_weights_for_every_count(
    ray_session, config_file
):
    config = load_config(config_file, ["train.reduction=exact"], {"tracking.enabled": False})
    report = verify(config, counts=(1, 2, 3), steps=STEPS)
    bitwise = [check for check in report.checks if check.key.startswith("bitwise")]
    assert len(bitwise) == 6  # gradient and weights, for 1, 2 and 3 workers
    assert all(check.status == "pass" and check.max_abs == 0.0 for check in bitwise), bitwise
    assert report.passed, report.failures()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--workers", "0"], "--workers 0: worker counts must be >= 1"),
        (["--workers", "1,two"], "--workers '1,two'"),
        (["--set", "train.reduction=fastest"], "train.reduction"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(config_file, args, fragment):
    code, output = invoke(config_file, *args, "--no-tracking")
    assert code == 2, output
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert fragment in line


def test_verify_needs_a_config_file():
    code, output = invoke()
    assert code == 2
    assert "verify needs a CONFIG file" in output
