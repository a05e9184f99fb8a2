"""Whether a run fits where it is about to start, answered before any worker starts.

Pure functions of the plan's estimate (service/data/estimate.py) and of the nodes (a name,
memory, total resources), so each answer can be checked by hand; and thin readers of this
machine's memory and of Ray's nodes. A problem is one line that names what does not fit,
where, by how much, and what to change; None when it fits.
"""

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

from shardprop.service.config import ClusterConfig, Config
from shardprop.service.data.estimate import (
    PlanEstimate,
    ShardEstimate,
    estimate_plan,
    human_bytes,
    output_units,
)
from shardprop.service.data.plan import DataPlan
from shardprop.workers.data.columns import NUMERIC, held_as
from shardprop.workers.data.synthetic import SyntheticSpec
from shardprop.workers.network.chunks import blas_threads

# RSS of Ray's own processes on a fresh local runtime, summed (measure_process_baselines)
RAY_PROCESSES_BYTES = 556 * 2**20
RESOURCE_SLACK = 1e-9  # resource amounts are decimals: 0.1 + 0.2 CPUs must fit in 0.3
RAY_MEMORY_KEYS = ("memory", "object_store_memory")


@dataclasses.dataclass(frozen=True)
class Node:
    """A machine the workers may run on."""

    name: str  # its address, as Ray shows it, or "this machine"
    memory: int  # bytes the run's worker processes can use on it
    resources: Mapping[str, float]  # totals, not what is free now: CPU, GPU, custom ones


def machine_memory() -> int:
    """Bytes this machine can give a run now: MemAvailable (Linux), capped by the cgroup's
    limit where one is set; elsewhere the total physical memory."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's limit (cgroup v2), less what the cgroup uses already
        group = Path("/sys/fs/cgroup")
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            used = int((group / "memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


def in_process_node() -> Node:
    """This machine, for a run without Ray (cluster.workers: 0)."""
    return Node("this machine", machine_memory(), {})


def local_ray_node(cpus: float, reserved: int = 0) -> Node:
    """This machine as the one node of the Ray runtime a run starts on it: the CPUs it will
    declare, the memory it has now less Ray's own processes and `reserved` bytes (the
    coordinator). No custom resources: a local start declares none."""
    memory = machine_memory() - RAY_PROCESSES_BYTES - reserved
    return Node("this machine", max(memory, 0), {"CPU": float(cpus)})


def nodes_before_ray(cluster: ClusterConfig, coordinator: int = 0) -> list[Node] | None:
    """The nodes a run will have, where they are known before Ray starts: this machine, for
    an in-process run or as the one node of a local runtime (with the CPUs connect_ray
    declares, and `coordinator` bytes set aside); None when the run joins a cluster, whose
    nodes ray_nodes reads once connected."""
    if not cluster.workers:
        return [in_process_node()]
    if cluster.address is not None:
        return None
    cpus = max(os.cpu_count() or 1, cluster.workers * cluster.cpus_per_worker)
    return [local_ray_node(cpus, coordinator)]


def ray_nodes(ray: ModuleType) -> list[Node]:
    """The alive nodes of the cluster `ray` is connected to (`ray.nodes()`), by address.

    A node's memory is what Ray found available when the node started, which it splits into
    its `memory` resource (the heap of tasks and actors) and its `object_store_memory` (shared
    memory for objects, which a run fills only with its parameters): the two together, less
    Ray's own processes on the node.
    """
    alive = [node for node in ray.nodes() if node.get("Alive")]
    shared = Counter(node["NodeManagerAddress"] for node in alive)
    nodes = []
    for node in alive:
        address = node["NodeManagerAddress"]
        name = address if shared[address] == 1 else f"{address} ({node['NodeID'][:8]})"
        totals = node.get("Resources", {})
        memory = int(sum(totals.get(key, 0) for key in RAY_MEMORY_KEYS)) - RAY_PROCESSES_BYTES
        resources = {
            key: value
            for key, value in totals.items()
            if key not in RAY_MEMORY_KEYS and not key.startswith("node:")
        }
        nodes.append(Node(name, max(memory, 0), resources))
    return nodes


def estimate_run(config: Config, plan: DataPlan, outputs: int | None = None) -> PlanEstimate:
    """The costs of a run of `config` on `plan`, as `shardprop plan` prints them and the
    memory check reads them; `outputs` units (None: as many as the config tells, else 1)."""
    synthetic = config.data.synthetic
    spec = SyntheticSpec(**synthetic.model_dump()) if synthetic else None
    workers = config.cluster.workers
    numeric = [column.name for column in plan.columns if column.kind == NUMERIC]
    types = plan.source.schema_of(numeric).types
    held = max((held_as(kind, config.model.dtype).itemsize for kind in types), default=None)
    return estimate_plan(
        plan.shards,
        # a categorical column whose levels are not read yet counts as one input
        sum(column.width or 1 for column in plan.columns),
        config.model.hidden,
        outputs or output_units(config.data.task, spec) or 1,
        config.model.dtype,
        workers,
        plan.grid,
        # a Ray worker's BLAS gets its CPUs; in-process, the worker runs on this process's
        config.cluster.cpus_per_worker if workers else blas_threads(),
        plan.source,
        config.data.validation_fraction,
        config.train.history_size if config.train.optimizer == "lbfgs" else 0,
        held,
    )


def worker_request(cluster: ClusterConfig) -> dict[str, float]:
    """What each worker asks Ray for: its CPUs and the custom resources the config names."""
    return {"CPU": float(cluster.cpus_per_worker), **cluster.worker_resources}


def fit_problem(
    estimate: PlanEstimate, cluster: ClusterConfig, nodes: Sequence[Node]
) -> str | None:
    """The first reason the run cannot start on `nodes`: workers Ray could never place, or
    memory the workers' peaks do not fit; None when it fits."""
    if cluster.workers:
        placement = placement_problem(worker_request(cluster), cluster.workers, nodes)
        if placement is not None:
            return placement
    return memory_problem(estimate, nodes)


def memory_problem(estimate: PlanEstimate, nodes: Sequence[Node]) -> str | None:
    """None if every worker's planned peak fits a node and all of them fit the nodes together,
    placed largest first on the node with the most memory left, as Ray spreads them; else one
    line naming the worker, the node, the figures and what to change."""
    shards = sorted(estimate.shards, key=lambda shard: shard.memory.peak, reverse=True)
    if not shards:
        return None
    if not nodes:
        return "memory: the cluster has no alive node to run the workers on"
    largest = max(nodes, key=lambda node: node.memory)
    biggest = shards[0]
    if biggest.memory.peak > largest.memory:
        where = "this machine has" if len(nodes) == 1 else f"the largest node, {largest.name}, has"
        return (
            f"memory: {worker_name(estimate, biggest)} needs {gib(biggest.memory.peak)} at its "
            f"peak but {where} {gib(largest.memory)}; "
            f"{shrink_one(estimate, biggest, largest, len(nodes))}"
        )
    free = {node.name: node.memory for node in nodes}
    for shard in shards:
        name = max(free, key=free.__getitem__)
        if shard.memory.peak > free[name]:
            total = sum(s.memory.peak for s in shards)
            processes = sum(s.memory.process for s in shards)
            held = ", ".join(f"{node.name} {gib(node.memory)}" for node in nodes)
            return (
                f"memory: the {len(shards)} workers need {gib(total)} together but the nodes "
                f"have {gib(sum(node.memory for node in nodes))} ({held}): "
                f"{worker_name(estimate, shard, shard.memory.peak)} finds no node with room "
                f"left; {shrink_all(estimate, processes, total)}"
            )
        free[name] -= shard.memory.peak
    return None


def worker_name(estimate: PlanEstimate, shard: ShardEstimate, peak: int | None = None) -> str:
    what = "the in-process run" if not estimate.workers else f"worker {shard.rank}"
    needs = "" if peak is None else f", {gib(peak)} at its peak"
    return f"{what} (rows {shard.start:,}..{shard.stop:,}{needs})"


def shrink_one(estimate: PlanEstimate, shard: ShardEstimate, node: Node, nodes: int) -> str:
    """What makes one worker's peak smaller: fewer rows each, if its rows weigh most; else a
    smaller network."""
    memory = shard.memory
    fixed = memory.process + memory.model  # what a worker costs however few rows it holds
    rows_part = memory.peak - fixed
    smaller_dtype = ", or model.dtype: float32" if estimate.dtype == "float64" else ""
    if rows_part <= memory.model or fixed >= node.memory:
        return (
            f"the network's parameters and buffers alone take {gib(memory.model)} a worker, "
            f"whatever the worker count: a smaller model.hidden{smaller_dtype}"
        )
    total_rows = sum(s.rows for s in estimate.shards)
    per_row = rows_part / max(shard.rows, 1)
    workers = math.ceil(total_rows * per_row / (node.memory - fixed))
    # more workers on the same machines hold the same rows: they need machines too
    machines = "machines" if nodes < workers else "nodes"
    return (
        f"its rows take {gib(rows_part)}: {workers} or more workers (cluster.workers) on as "
        f"many {machines} this size, or fewer features (data.features){smaller_dtype}"
    )


def shrink_all(estimate: PlanEstimate, processes: int, total: int) -> str:
    """What makes the workers' sum smaller: fewer processes, if they weigh most."""
    if processes + sum(s.memory.model for s in estimate.shards) >= total / 2:
        each = gib(estimate.shards[0].memory.process)
        return f"fewer workers (cluster.workers; each process takes {each} before its rows)"
    return "more nodes, or fewer rows or features (data.features)"


def placement_problem(
    request: Mapping[str, float], count: int, nodes: Sequence[Node]
) -> str | None:
    """None if `count` workers that each ask for `request` ({"CPU": 1, "shard_slot": 1})
    can all be placed at once on the nodes' total resources (a node holds as many as its
    scarcest resource allows), whatever else runs now; else one line saying what cannot be
    placed and what the cluster has."""
    asked = {key: amount for key, amount in request.items() if amount > 0}
    if not asked or count <= 0:
        return None
    fits = {node.name: node_capacity(asked, node) for node in nodes}
    if sum(fits.values()) >= count:
        return None
    have = sorted({key for node in nodes for key in node.resources})
    missing = [key for key in asked if not any(node.resources.get(key) for node in nodes)]
    each = ", ".join(f"{key}: {amount:g}" for key, amount in asked.items())
    if missing:
        return (
            f"placement: each of the {count} workers asks for {{{each}}} but no node has "
            f"{', '.join(repr(key) for key in missing)} (the nodes have: {', '.join(have)}); "
            "fix cluster.worker_resources or start the nodes with that resource"
        )
    totals = "; ".join(
        f"{node.name}: {describe(node.resources, asked)} -> {fits[node.name]}" for node in nodes
    )
    return (
        f"placement: {count} workers asking for {{{each}}} each can never all be placed: the "
        f"cluster holds {sum(fits.values())} at most ({totals}); fewer workers "
        "(cluster.workers), fewer cpus_per_worker, or more nodes"
    )


def node_capacity(asked: Mapping[str, float], node: Node) -> int:
    """How many workers asking for `asked` fit a node's total resources."""
    return min(
        math.floor(node.resources.get(key, 0.0) / amount + RESOURCE_SLACK)
        for key, amount in asked.items()
    )


def describe(resources: Mapping[str, float], asked: Mapping[str, float]) -> str:
    return ", ".join(f"{key} {resources.get(key, 0.0):g}" for key in asked)


def gib(count: int) -> str:
    """Memory in GiB, or in MiB below one GiB, as a node's memory is shown."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else human_bytes(count)
