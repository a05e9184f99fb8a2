"""The plan's memory against what real workers hold, and the cluster checks against what a
real Ray runtime reports and places. Each Ray runtime here lives in a fresh process of its
own: its resources are the test's, and a process's peak memory is only its own there."""

from pathlib import Path

import pytest

from shardprop.service.bench.data import measure_run, write_dataset
from shardprop.service.cluster.capacity import (
    RAY_PROCESSES_BYTES,
    Node,
    machine_memory,
    placement_problem,
    ray_nodes,
)
from tests.processes import in_fresh_process

ROWS, FEATURES, FILES = 1_000_000, 64, 8  # a data-heavy job: 512 MB of float64 features
WITHIN = 0.15  # of the measured peak


def nodes_and_placements() -> tuple[list[Node], int, list[bool]]:
    """A local runtime of 2 CPUs and one 'shard_slot': its nodes as ray_nodes reads them, the
    memory Ray reports, and which of 2 actors asking for a slot each Ray could start."""
    import ray

    ray.init(num_cpus=2, resources={"shard_slot": 1}, include_dashboard=False)
    try:

        class Slot:
            def ready(self) -> bool:
                return True

        actor = ray.remote(Slot).options(num_cpus=1, resources={"shard_slot": 1})
        actors = [actor.remote() for _ in range(2)]
        calls = [a.ready.remote() for a in actors]
        first, rest = ray.wait(calls, timeout=60)
        done = first + ray.wait(rest, timeout=3)[0]  # enough for a free slot's actor to start
        totals = ray.cluster_resources()
        reported = int(totals["memory"] + totals["object_store_memory"])
        return ray_nodes(ray), reported, [call in done for call in calls]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_cluster() -> tuple[list[Node], int, list[bool]]:
    return in_fresh_process(nodes_and_placements)


def test_ray_nodes_reads_the_cpus_custom_resources_and_memory_ray_reports(local_cluster):
    nodes, reported, _ = local_cluster
    assert len(nodes) == 1
    node = nodes[0]
    assert node.resources == {"CPU": 2.0, "shard_slot": 1.0}  # no node:..., no memory keys
    assert node.memory == reported - RAY_PROCESSES_BYTES
    # Ray's figure is what the machine had available when the node started
    assert abs(reported - machine_memory()) < 0.1 * reported


def test_placement_check_agrees_with_what_ray_places(local_cluster):
    nodes, _, placed = local_cluster
    assert sorted(placed) == [False, True]  # one slot: the second actor waits for ever
    request = {"CPU": 1, "shard_slot": 1}
    assert placement_problem(request, 1, nodes) is None
    line = placement_problem(request, 2, nodes)
    assert line is not None and "holds 1 at most" in line
    assert "no node has 'gpu_slot'" in (placement_problem({"gpu_slot": 1}, 1, nodes) or "")


@pytest.fixture(scope="module")
def heavy_table(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("heavy"), ROWS, FILES, FEATURES)


# in-process: the whole run with MLflow, a quarter of a minute more: with the slow tests
@pytest.mark.parametrize("workers", [2, pytest.param(0, marks=pytest.mark.slow)])
def test_the_plan_is_within_15_percent_of_each_workers_peak(heavy_table, tmp_path, workers):
    """2 Ray workers that report their own peak resident size, and the in-process run (MLflow
    tracking included) whose process holds everything."""
    figures = in_fresh_process(measure_run, str(heavy_table), workers, tmp_path)
    ratios = {key: value for key, value in figures.items() if key.endswith("_over_plan")}
    assert len(ratios) == max(workers, 1)
    assert all(1 - WITHIN <= ratio <= 1 + WITHIN for ratio in ratios.values()), figures


def refused(*sets: str) -> list[str]:
    from typer.testing import CliRunner

    from shardprop.service.cli.app import app

    args = ["train", "/dev/null", "--no-tracking", *(a for s in sets for a in ("--set", s))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    return result.output.strip().splitlines()


def test_a_network_no_node_can_hold_is_refused_before_ray_starts():
    (line,) = refused("model.hidden=[3000000]", "cluster.workers=2")
    assert line.startswith("error: memory: "), line
    assert "GiB" in line and ("model.hidden" in line or "float32" in line), line


def test_workers_a_local_runtime_could_never_place_are_refused_before_ray_starts():
    (line,) = refused("cluster.worker_resources={shard_slot: 1}")
    assert line.startswith("error: "), line
    assert "shard_slot" in line, line
