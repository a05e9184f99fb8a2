"""Whether a plan fits the nodes: each worker's peak on some node, all of them together, and
a worker's resource request on the nodes' totals; one line that says what to change."""

import pytest

from shardprop.service.cluster.capacity import (
    RAY_PROCESSES_BYTES,
    Node,
    estimate_run,
    fit_problem,
    local_ray_node,
    machine_memory,
    memory_problem,
    nodes_before_ray,
    placement_problem,
    worker_request,
)
from shardprop.service.config import load_config
from shardprop.service.data.estimate import (
    WORKER_PROCESS_BYTES,
    PlanEstimate,
    ShardEstimate,
    StepFlops,
    StepTraffic,
    WorkerMemory,
    estimate_plan,
)
from shardprop.service.training.run import make_plan

GiB = 2**30
NO_FLOPS = StepFlops(0, 0, 0)


def plan_of(*memories: WorkerMemory, rows: int = 1000, workers: int | None = None) -> PlanEstimate:
    """Workers of `rows` rows each, holding what `memories` say, in float64."""
    shards = tuple(
        ShardEstimate(rank, rank * rows, (rank + 1) * rows, memory, NO_FLOPS)
        for rank, memory in enumerate(memories)
    )
    count = len(memories) if workers is None else workers
    return PlanEstimate((1, 1), 2, shards, StepTraffic(0, 0), NO_FLOPS, count, "float64")


def held(rows_bytes: int = 0, model: int = 0, process: int = GiB // 4) -> WorkerMemory:
    """A worker whose rows take `rows_bytes` and whose network takes `model`."""
    return WorkerMemory(
        batch=rows_bytes, activations=model, deltas=0, parameters=0, loading=0, process=process
    )


def test_workers_that_fit_their_nodes_are_no_problem():
    nodes = [Node("a", 4 * GiB, {"CPU": 2}), Node("b", 4 * GiB, {"CPU": 2})]
    assert memory_problem(plan_of(*[held(GiB)] * 4), nodes) is None  # 1.25 GiB, 2 a node
    assert memory_problem(plan_of(), nodes) is None


def test_a_shard_too_big_for_any_node_asks_for_more_workers_when_its_rows_weigh_most():
    plan = plan_of(held(12 * GiB), held(12 * GiB), rows=5_000_000)
    line = memory_problem(plan, [Node("10.0.0.1", 8 * GiB, {}), Node("10.0.0.2", 4 * GiB, {})])
    assert line is not None and "\n" not in line
    assert "worker 0 (rows 0..5,000,000) needs 12.2 GiB" in line
    assert "but the largest node, 10.0.0.1, has 8.0 GiB" in line
    # 24 GiB of rows over nodes with 7.75 GiB for rows: 4 workers, more than the 2 nodes
    assert "its rows take 12.0 GiB: 4 or more workers (cluster.workers) on as many machines" in line
    assert "fewer features (data.features), or model.dtype: float32" in line


def test_a_network_too_big_for_the_machine_asks_for_a_smaller_model():
    """model.hidden=[3000000]: a chunk's activations and deltas, whatever the rows."""
    config = load_config(
        None, ["data.synthetic={name: moons, rows: 20000}", "model.hidden=[3000000]"]
    )
    estimate = estimate_run(config, make_plan(config))
    assert estimate.peaks[0] > 30 * GiB
    line = memory_problem(estimate, [Node("this machine", 24 * GiB, {"CPU": 2})])
    assert line is not None and "worker 0 (rows 0..10,240) needs 34.7 GiB" in line  # exact: blocks
    assert "but this machine has 24.0 GiB" in line
    assert "a smaller model.hidden, or model.dtype: float32" in line
    assert "cluster.workers" not in line  # more workers would not help


def test_the_in_process_run_is_named_as_such():
    plan = plan_of(held(30 * GiB), rows=10, workers=0)
    line = memory_problem(plan, [Node("this machine", 8 * GiB, {})])
    assert line is not None and line.startswith("memory: the in-process run (rows 0..10)")


def test_many_small_workers_that_overflow_the_nodes_together_ask_for_fewer_workers():
    """--workers 64 on one machine: each process's baseline adds up."""
    estimate = estimate_plan(
        [(r * 100, (r + 1) * 100) for r in range(64)], 4, [8], 1, "float64", 64
    )
    assert all(peak > WORKER_PROCESS_BYTES for peak in estimate.peaks)
    room = 8 * GiB
    assert sum(estimate.peaks) > room > max(estimate.peaks)
    line = memory_problem(estimate, [Node("this machine", room, {"CPU": 64})])
    assert line is not None and "\n" not in line
    assert "the 64 workers need 14.6 GiB together but the nodes have 8.0 GiB" in line
    assert "MiB at its peak) finds no node with room left" in line
    assert "fewer workers (cluster.workers; each process takes 234.0 MiB" in line


def test_workers_are_spread_over_the_nodes_largest_first():
    """3 + 3 + 2 + 2 fits nodes of 5 and 5 only as 3 + 2 on each."""
    plan = plan_of(
        held(2 * GiB, process=0),
        held(2 * GiB, process=0),
        held(3 * GiB, process=0),
        held(3 * GiB, process=0),
    )
    nodes = [Node("a", 5 * GiB, {}), Node("b", 5 * GiB, {})]
    assert memory_problem(plan, nodes) is None
    assert memory_problem(plan, [Node("a", 5 * GiB, {}), Node("b", 4 * GiB, {})]) is not None


def test_no_alive_node_is_a_problem():
    assert memory_problem(plan_of(held(1)), []) == (
        "memory: the cluster has no alive node to run the workers on"
    )


@pytest.mark.parametrize(
    "request_, count, fits",
    [
        ({"CPU": 1}, 4, True),  # 2 + 2
        ({"CPU": 1}, 5, False),
        ({"CPU": 2}, 2, True),
        ({"CPU": 3}, 1, False),  # 4 CPUs in all, but never 3 on one node
        ({"CPU": 0.5}, 8, True),
        ({"CPU": 0.1}, 20, True),  # decimals: 10 x 0.1 fills a CPU
        ({"CPU": 1, "shard_slot": 1}, 1, True),
        ({"CPU": 1, "shard_slot": 1}, 2, False),  # one node has the slot
        ({"CPU": 0}, 100, True),  # asks for nothing: goes anywhere
    ],
)
def test_placement_is_judged_on_each_nodes_totals(request_, count, fits):
    nodes = [Node("a", GiB, {"CPU": 2, "shard_slot": 1}), Node("b", GiB, {"CPU": 2})]
    assert (placement_problem(request_, count, nodes) is None) is fits


def test_a_worker_count_the_cpus_cannot_hold_says_what_the_cluster_has():
    nodes = [Node("10.0.0.1", GiB, {"CPU": 1}), Node("10.0.0.2", GiB, {"CPU": 1})]
    line = placement_problem({"CPU": 1}, 3, nodes)
    assert line is not None and "\n" not in line
    assert "3 workers asking for {CPU: 1} each can never all be placed" in line
    assert "holds 2 at most (10.0.0.1: CPU 1 -> 1; 10.0.0.2: CPU 1 -> 1)" in line


def test_a_resource_no_node_has_is_named():
    line = placement_problem({"CPU": 1, "shard_slot": 1}, 2, [local_ray_node(2)])
    assert line is not None
    assert "no node has 'shard_slot'" in line and "the nodes have: CPU" in line
    assert "cluster.worker_resources" in line


def test_this_machine_gives_its_available_memory_less_rays_processes():
    available = machine_memory()
    assert available > 0
    node = local_ray_node(3, reserved=GiB)
    assert node.resources == {"CPU": 3.0}
    # MemAvailable moves a little between the two reads
    assert abs(node.memory - (available - RAY_PROCESSES_BYTES - GiB)) < GiB / 4


def test_a_worker_asks_for_its_cpus_and_the_configs_custom_resources():
    cluster = load_config(
        None, ["cluster.cpus_per_worker=2", "cluster.worker_resources={shard_slot: 1}"]
    ).cluster
    assert worker_request(cluster) == {"CPU": 2.0, "shard_slot": 1}


def test_placement_is_told_before_memory_and_in_process_asks_for_no_cpu():
    nodes = [Node("a", GiB, {"CPU": 1}), Node("b", GiB, {"CPU": 1})]
    big = plan_of(held(8 * GiB), held(8 * GiB), held(8 * GiB))
    three = load_config(None, [], {"cluster.workers": 3}).cluster
    assert (fit_problem(big, three, nodes) or "").startswith("placement: 3 workers")
    fitting = plan_of(held(GiB // 8), held(GiB // 8))
    assert fit_problem(fitting, load_config(None, []).cluster, nodes) is None
    in_process = load_config(None, [], {"cluster.workers": 0}).cluster
    alone = plan_of(held(8 * GiB), workers=0)
    assert (fit_problem(alone, in_process, [Node("this machine", GiB, {})]) or "").startswith(
        "memory: the in-process run"
    )


def test_the_nodes_before_ray_starts_are_this_machine_unless_joining_a_cluster():
    def nodes(**flags):
        return nodes_before_ray(load_config(None, [], flags).cluster, coordinator=GiB)

    [alone] = nodes(**{"cluster.workers": 0})
    assert alone.resources == {} and alone.memory > local_ray_node(1, GiB).memory
    [local] = nodes(**{"cluster.workers": 64})
    assert local.resources == {"CPU": 64.0}  # a local start declares what the workers ask
    assert nodes(**{"cluster.address": "ray://head:10001"}) is None
