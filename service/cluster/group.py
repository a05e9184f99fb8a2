"""The worker group: k ShardWorkers, in this process or as Ray actors, behind one interface.

The training loop only calls `call(method, *args)` and gets the results in rank order, so it
never imports Ray, and `--workers 0` runs the very same loop in-process.
"""

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NoReturn, Protocol

import numpy as np

from shardprop.service.cluster.capacity import (
    memory_problem,
    placement_problem,
    ray_nodes,
    worker_request,
)
from shardprop.service.cluster.compiled import BrokenStepError, CompiledStep, compile_step
from shardprop.service.cluster.kept import KeptWorkers
from shardprop.service.cluster.policy import Decision, FailurePolicy
from shardprop.service.cluster.runtime import code_to_ship, connect_ray
from shardprop.service.cluster.waits import interruptible
from shardprop.service.config import ClusterConfig
from shardprop.service.data.estimate import PlanEstimate
from shardprop.service.data.plan import DataPlan
from shardprop.service.errors import ConfigError, TrainingError
from shardprop.workers.chaos import WHEN, ChaosWorker, InjectedFailure
from shardprop.workers.errors import UserError
from shardprop.workers.shard import ShardWorker

# calls that build a worker's state: replayed, in order, on a replacement worker
STATE_METHODS = ("load", "prepare")
SPIN_MARGIN_SHARE = 0.01  # of a step's compute, awake before the sums are due
SPIN_MARGIN_SECONDS = 0.3e-3  # at least
NOTICE_SECONDS = 10.0  # a wait for workers longer than this says what it waits for
STEP_TIMEOUT_FACTOR = 10  # with no cluster.step_timeout: this many times the longest step
GROW_CHECK_SECONDS = 5.0  # an elastic group below its largest size looks for room this often

log = logging.getLogger(__name__)


class NoRoomError(TrainingError):
    """Workers Ray could not place within the time they were given."""


class WorkerGroup(Protocol):
    size: int
    restarts: int  # workers replaced so far
    changes: list[str]  # each change of size (elastic runs), with its cause

    def call(
        self, method: str, *args: Any, while_waiting: Callable[[], None] | None = None
    ) -> list[Any]:
        """Run a ShardWorker method on every worker; results in rank order. `while_waiting`:
        the caller's own work, done once while the workers compute."""

    def inject(self, failure: InjectedFailure) -> None:
        """Arm a chaos failure: the next `gradient` calls on that worker kill its process."""

    def compile(self, method: str = "gradient") -> None:
        """Set up the transport the `method` calls take, before the loop that makes them."""

    def prepare_steps(self, theta: np.ndarray, method: str = "gradient") -> None:
        """compile(), then a first, warm-up call: for callers that time every call."""

    def grow(self) -> str | None:
        """At a step boundary: more workers, where the group may grow and the cluster has
        room for them; what changed, or None."""

    def close(self, keep: bool = False) -> None:
        """Stop the workers (and a Ray runtime the group started); safe to call twice.
        `keep`: the run is done with them, and a next run in this process may take them."""


class LocalGroup:
    """One worker holding every row, in this process: the reference run."""

    def __init__(self, plan: DataPlan, worker_class: type[ShardWorker] = ShardWorker):
        self.workers = [
            worker_class(
                0, plan.source, plan.columns, plan.label, 0, plan.total_rows, grid=plan.grid
            )
        ]
        self.size = 1
        self.restarts = 0
        self.changes: list[str] = []

    def call(
        self, method: str, *args: Any, while_waiting: Callable[[], None] | None = None
    ) -> list[Any]:
        if while_waiting is not None:
            while_waiting()  # nothing runs beside this process's own worker: first, then
        return [getattr(worker, method)(*args) for worker in self.workers]

    def inject(self, failure: InjectedFailure) -> None:
        raise ConfigError("--inject-failure kills a worker process: it needs --workers 1 or more")

    def compile(self, method: str = "gradient") -> None:
        pass  # in-process calls have no transport to set up

    def prepare_steps(self, theta: np.ndarray, method: str = "gradient") -> None:
        pass  # nor a first call that would differ from the next

    def grow(self) -> str | None:
        return None  # one process: nothing to grow

    def close(self, keep: bool = False) -> None:
        self.workers.clear()


class RayGroup:
    """One Ray actor per shard, each with `cpus_per_worker` CPUs and as many BLAS threads.

    Every wait has a bound. A worker must be placed and set up within `start_timeout`
    seconds. A worker whose process dies (or that does not answer within `timeout` seconds;
    None: STEP_TIMEOUT_FACTOR times the longest step so far, at least `start_timeout`) is
    replaced by a new actor that rebuilds the same state from the same calls, and the call is
    made again, as long as the failure policy allows. `worker_class`: ShardWorker or a
    subclass (chaos testing, benchmarks). The step's calls take the `transport`,
    a compiled graph or plain actor calls; every other call, a step that failed on the graph
    and a step with a chaos failure armed take plain calls.
    """

    def __init__(
        self,
        plan: DataPlan,
        cpus_per_worker: int,
        owns_runtime: bool,
        policy: FailurePolicy | None = None,
        timeout: float | None = None,
        start_timeout: float = 600.0,
        placement: str = "spread",
        resources: dict[str, float] | None = None,
        transport: str = "compiled",
        worker_class: type[ShardWorker] = ShardWorker,
        sizes: tuple[int, int] | None = None,
        replace_timeout: float | None = None,
        estimate_for: Callable[[DataPlan], PlanEstimate] | None = None,
        kept: KeptWorkers | None = None,
    ):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        # in a sweep's trial, the trial's placement group holds its workers' resources
        trial = ray.util.get_current_placement_group()
        strategy: Any = "SPREAD" if placement == "spread" else "DEFAULT"
        if trial is not None:
            strategy = PlacementGroupSchedulingStrategy(trial)
        # what a kept worker must have been made with to serve this group
        held_by = trial.id.hex() if trial is not None else None
        asked = (cpus_per_worker, sorted((resources or {}).items()), transport)
        self._made_as = (worker_class, *asked, held_by)
        self._actor = ray.remote(worker_class).options(
            num_cpus=cpus_per_worker, resources=resources or {}, scheduling_strategy=strategy
        )
        self.request = {"CPU": float(cpus_per_worker), **(resources or {})}  # per worker
        # rows held in memory go to Ray's object store once, a piece per shard, and each
        # worker (a replacement too) fetches its own
        source = plan.source.stored(ray.put) if plan.source.pieces else plan.source
        self._plan = plan = replace(plan, source=source)
        self._cpus = cpus_per_worker
        self._spawn_args = self._args_for(plan)
        self._shards = plan.shards
        # elastic: the fewest workers to go on with and the most to grow to
        self._smallest, self._largest = sizes or (len(plan.shards), len(plan.shards))
        self._replace_timeout = replace_timeout or start_timeout
        self._next_grow_check = time.monotonic() + GROW_CHECK_SECONDS
        self._estimate_for = estimate_for  # a plan's memory, checked before each resize
        self.changes: list[str] = []  # each change of size, with its cause, in order
        self._owns_runtime = owns_runtime
        self._policy = policy or FailurePolicy(max_failures=0)
        self._timeout = timeout
        self._start_timeout = start_timeout
        self._longest_step = 0.0  # seconds, the step calls' wall time
        self._state_calls: list[tuple[str, tuple]] = []
        self._armed: dict[int, list[str]] = {}  # rank -> methods to call instead of gradient
        # a compile can fail for a worker that died just before it: a replaced worker gets
        # the wanted transport tried again
        self._transport = self._wanted_transport = transport
        self._step_method = "gradient"  # the calls that take the transport
        self._graph: CompiledStep | None = None
        # the slowest worker's compute in the last two compiled steps: the next one sleeps
        # through all but a margin of the smaller (a one-off slow step must not make the
        # next one wait), then spins for the sums
        self._computes: deque[float] = deque(maxlen=2)
        if self._smallest < self._largest:
            # an autoscaler adds the nodes for the largest size; room for fewer than asked
            # starts the run on what there is (at least min_workers) and it grows later
            self._ask_autoscaler(self._largest)
            room = self._room()
            fits = self._smallest <= room < len(plan.shards) and not self._memory_problem(room)
            if fits:
                cause = f"room for {room} at the start"
                self.changes.append(f"{len(plan.shards)} -> {room} workers: {cause}")
                self._plan = plan = plan.resharded(room)
                self._shards, self._spawn_args = plan.shards, self._args_for(plan)
        # a runtime the group stops at its close keeps nothing for a next run
        self._kept = None if owns_runtime else kept
        self.actors = self._renewed(self._kept) if self._kept else []
        self.size = len(self._spawn_args)
        if not self.actors:
            self.actors = [self._actor.remote(*args) for args in self._spawn_args]
            try:
                self._await_placed(dict(enumerate(self.actors)))
            except BaseException:
                self.close()
                raise

    def _shape(self, size: int) -> tuple:
        """What a group of `size` workers must ask for to take this group's kept workers."""
        return (*self._made_as, size)

    def _renewed(self, kept: KeptWorkers) -> list[Any]:
        """A last run's kept workers of this shape, renewed with this group's shards; none
        where there are none, or they no longer answer."""
        actors = kept.take(self._shape(len(self._spawn_args)))
        if not actors:
            return []
        pairs = zip(actors, self._spawn_args, strict=True)
        refs = [actor.renew.remote(*args) for actor, args in pairs]
        try:
            interruptible(self._ray.get, refs, timeout=self._start_timeout)
        except (self._ray.exceptions.RayError, TimeoutError):  # lost meanwhile: new ones
            for actor in actors:
                self._ray.kill(actor)
            return []
        return actors

    @property
    def restarts(self) -> int:
        return self._policy.restarts

    def call(
        self, method: str, *args: Any, while_waiting: Callable[[], None] | None = None
    ) -> list[Any]:
        started = time.monotonic()
        results = self._call(method, args, while_waiting)
        if method == self._step_method:
            self._longest_step = max(self._longest_step, time.monotonic() - started)
            self._computes.append(max(r.seconds for r in results))
        return results

    def _call(
        self, method: str, args: tuple, while_waiting: Callable[[], None] | None
    ) -> list[Any]:
        # once: a compiled step that gives up hands the call on to plain calls
        while_waiting = functools.cache(while_waiting or (lambda: None))
        armed = any(self._armed.values())
        # reading a graph's results spins on a core until they are there: a step goes by the
        # graph once a step's compute is known, to sleep through most of it first
        compiled = self._transport == "compiled" and self._computes and not armed
        if method == self._step_method and compiled:
            results = self._call_compiled(args, while_waiting)
            if results is not None:
                return results
        args = self._broadcast(args)
        results: dict[int, Any] = {}
        pending = {rank: self._submit(rank, method, args) for rank in range(self.size)}
        while_waiting()
        while pending:
            lost = {}
            timeout = self._timeout_for(method)
            deadline = time.monotonic() + timeout
            for rank, future in pending.items():
                try:
                    left = max(0.0, deadline - time.monotonic())
                    results[rank] = interruptible(self._ray.get, future, timeout=left)
                except self._ray.exceptions.RayTaskError as error:
                    raise_user_error(error)
                except self._ray.exceptions.RayActorError:
                    lost[rank] = "its process died"
                except self._ray.exceptions.GetTimeoutError:
                    if method in STATE_METHODS:  # slow, not lost: a new worker would be too
                        raise TrainingError(
                            f"worker {rank} did not finish {method}() within {timeout:.0f} s "
                            "(cluster.start_timeout)"
                        ) from None
                    lost[rank] = f"no answer within {timeout:.0f} s"
            pending = {}
            for rank, reason in lost.items():
                if self._recover(rank, method, reason):  # other shards now: all again
                    results.clear()
                    pending = {r: self._submit(r, method, args) for r in range(self.size)}
                    break
                pending[rank] = self._submit(rank, method, args)
        if method in STATE_METHODS:
            self._state_calls.append((method, args))
        return [results[rank] for rank in range(self.size)]

    def _broadcast(self, args: tuple) -> tuple:
        """One object-store copy per array, shared by every worker."""
        return tuple(self._ray.put(a) if isinstance(a, np.ndarray) else a for a in args)

    def _call_compiled(self, args: tuple, while_waiting: Callable[[], None]) -> list[Any] | None:
        """The step through the compiled graph, compiled first if need be; None when it
        could not be made: plain calls then make it, and find any lost worker."""
        if self._graph is None and not self._compile():
            return None
        try:
            results = self._graph(
                self._step_method,
                args,
                timeout=self._timeout_for(self._step_method),
                expected=self._expected(),
                while_waiting=while_waiting,
            )
        except BrokenStepError:
            self._drop_graph()  # the others' results went with it: plain calls redo the step
            return None
        except self._ray.exceptions.RayTaskError as error:
            raise_user_error(error)
        return results

    def _compile(self) -> bool:
        """False when the graph could not be made: a worker lost (plain calls find it, the
        next step compiles again), or none can be (plain calls from now on)."""
        try:
            self._graph = compile_step(self._ray, self.actors, self._start_timeout)
        except BrokenStepError:
            return False
        except self._ray.exceptions.RayTaskError as error:
            raise_user_error(error)
        if self._graph is None:
            self._transport = "plain"
        return self._graph is not None

    def compile(self, method: str = "gradient") -> None:
        """Set the graph for `method` calls up now, so that the loop's first step is a
        step; compiled again after a worker is replaced."""
        self._step_method = method
        if self._transport == "compiled" and self._graph is None:
            self._compile()

    def prepare_steps(self, theta: np.ndarray, method: str = "gradient") -> None:
        """Set the graph up anew and make a first, warm-up `method` call: for callers that
        time every call (the bench)."""
        self._drop_graph()
        self.compile(method)
        self.call(method, theta)

    def _expected(self) -> float:
        """How long a compiled step sleeps before it reads the sums: it wakes a margin before
        they are due, a larger share of a short step, whose time varies more."""
        compute = min(self._computes, default=0.0)
        return compute - max(SPIN_MARGIN_SECONDS, SPIN_MARGIN_SHARE * compute)

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None

    def _timeout_for(self, method: str) -> float:
        if method in STATE_METHODS:
            return self._start_timeout  # reading the rows takes long
        if self._timeout is not None:
            return self._timeout
        return max(self._start_timeout, STEP_TIMEOUT_FACTOR * self._longest_step)

    def _await_placed(
        self, actors: dict[int, Any], replacing: bool = False, elastic: bool = False
    ) -> None:
        """Wait until these workers (rank: actor) are placed and answer, at most
        start_timeout seconds (replace_timeout for an `elastic` replacement), saying what it
        waits for once the wait gets long."""
        ray = self._ray
        pending = {actor.where.remote(): rank for rank, actor in actors.items()}
        timeout, key = (
            (self._replace_timeout, "cluster.replace_timeout")
            if elastic
            else (self._start_timeout, "cluster.start_timeout")
        )
        deadline = time.monotonic() + timeout
        told = False
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoRoomError(
                    f"{self._unplaced(sorted(pending.values()), replacing)}, after waiting "
                    f"{timeout:.0f} s ({key})"
                )
            ready, _ = interruptible(
                ray.wait,
                list(pending),
                num_returns=len(pending),
                timeout=min(left, NOTICE_SECONDS),
            )
            for ref in ready:
                pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    raise_user_error(error)
            if pending and not told and deadline > time.monotonic():
                told = True
                log.warning(
                    "%s; waiting up to %.0f s more (%s)",
                    self._unplaced(sorted(pending.values()), replacing),
                    deadline - time.monotonic(),
                    key,
                )

    def _unplaced(self, ranks: list[int], replacing: bool) -> str:
        free = self._ray.available_resources()
        free = {key: value for key, value in free.items() if key in self.request}
        what = "the replacement of worker" if replacing else "worker(s)"
        return (
            f"{what} {', '.join(map(str, ranks))} could not be placed: each needs "
            f"{format_resources(self.request)}; the cluster has "
            f"{format_resources(free) or 'none of that'} free"
        )

    def _submit(self, rank: int, method: str, args: tuple) -> Any:
        if method == "gradient" and self._armed.get(rank):
            method = self._armed[rank].pop(0)
        return getattr(self.actors[rank], method).remote(*args)

    def _recover(self, rank: int, method: str, reason: str) -> bool:
        """Replace a lost worker; True when the group went on with fewer workers instead
        (elastic: no room for the replacement within replace_timeout)."""
        self._ray.kill(self.actors[rank])  # a hung worker must not linger, nor be waited for
        self._drop_graph()  # compiled for the lost actor: compiled again for its replacement
        self._transport = self._wanted_transport
        start, stop = self._shards[rank]
        if self._policy.on_lost(rank, reason) is Decision.RAISE:
            raise TrainingError(
                f"worker {rank} (rows {start}..{stop}) was lost during {method}() ({reason}); "
                f"{len(self._policy.failures)} failures are more than "
                f"cluster.max_worker_failures={self._policy.max_failures}"
            )
        log.warning(
            "worker %d (rows %d..%d) lost during %s() (%s): replacing it",
            rank,
            start,
            stop,
            method,
            reason,
        )
        actor = self._actor.remote(*self._spawn_args[rank])
        elastic = self.size > self._smallest
        try:
            self._await_placed({rank: actor}, replacing=True, elastic=elastic)
            for state_method, state_args in self._state_calls:  # the same rows, the same state
                ref = getattr(actor, state_method).remote(*state_args)
                interruptible(self._ray.get, ref, timeout=self._start_timeout)
        except BaseException as error:
            self._ray.kill(actor)
            if elastic and isinstance(error, NoRoomError):
                cause = f"worker {rank} lost during {method}() ({reason}), no room to replace it"
                if problem := self._memory_problem(self.size - 1):
                    raise TrainingError(
                        f"{cause}; the other workers cannot take its rows: {problem}"
                    ) from None
                self._resize(self.size - 1, cause)
                return True
            if isinstance(error, self._ray.exceptions.GetTimeoutError):
                raise TrainingError(
                    f"the replacement of worker {rank} did not set up within "
                    f"{self._start_timeout:.0f} s (cluster.start_timeout)"
                ) from None
            raise
        self.actors[rank] = actor
        return False

    def _args_for(self, plan: DataPlan) -> list[tuple]:
        """Each rank's ShardWorker arguments."""
        return [
            (rank, plan.source, plan.columns, plan.label, start, stop, self._cpus, plan.grid)
            for rank, (start, stop) in enumerate(plan.shards)
        ]

    def _ask_autoscaler(self, workers: int) -> None:
        """Room for `workers` workers in all, which an autoscaler adds nodes for (Ray's
        request_resources: a hint, kept until the next call; no autoscaler, no effect)."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[self.request] * workers)

    def _room(self) -> int:
        """How many more workers the cluster has free resources for now."""
        free = self._ray.available_resources()
        return min(int(free.get(key, 0.0) // need) for key, need in self.request.items() if need)

    def _memory_problem(self, size: int) -> str | None:
        """Why `size` workers' shards would not fit the nodes alive now; None if they do."""
        if self._estimate_for is None:
            return None
        return memory_problem(self._estimate_for(self._plan.resharded(size)), ray_nodes(self._ray))

    def grow(self) -> str | None:
        if self.size >= self._largest or time.monotonic() < self._next_grow_check:
            return None
        self._next_grow_check = time.monotonic() + GROW_CHECK_SECONDS
        room = self._room()
        if room < 1:
            return None
        size, before = min(self._largest, self.size + room), self.size
        try:
            return self._resize(size, f"room for {size - before} more worker(s)")
        except NoRoomError:  # the room went to others meanwhile: back to the size it had
            self.changes.pop()
            self._resize(before, "the room was gone")
            self.changes.pop()
            return None

    def _resize(self, size: int, cause: str) -> str:
        """`size` new workers on the same rows, each reading its shard and replaying the
        set-up calls. The exact reduction's sums do not depend on how the rows are cut, so
        the run goes on to the same bits; rank order's change with the cut."""
        change = f"{self.size} -> {size} workers: {cause}"
        log.warning("resizing from %s", change)
        self.changes.append(change)
        self._drop_graph()
        for actor in self.actors:
            self._ray.kill(actor)
        plan = self._plan.resharded(size)
        self._shards, self._spawn_args = plan.shards, self._args_for(plan)
        self.actors = [self._actor.remote(*args) for args in self._spawn_args]
        self.size = size
        self._armed.clear()
        self._computes.clear()  # steps of another size: the next one goes by plain calls
        self._transport = self._wanted_transport
        self._await_placed(dict(enumerate(self.actors)))
        for method, args in self._state_calls:  # the same state, on the new rows
            refs = [getattr(actor, method).remote(*args) for actor in self.actors]
            interruptible(self._ray.get, refs, timeout=self._start_timeout)
        return change

    def inject(self, failure: InjectedFailure) -> None:
        if not 0 <= failure.worker < self.size:
            raise ConfigError(
                f"--inject-failure worker={failure.worker}: ranks are 0..{self.size - 1}"
            )
        self._armed[failure.worker] = [WHEN[failure.when]] * failure.times

    def close(self, keep: bool = False) -> None:
        self._drop_graph()
        if keep and self._kept is not None and self.actors:
            self._kept.keep(self._shape(len(self.actors)), self.actors)
            self.actors = []
            return
        for actor in self.actors:
            self._ray.kill(actor)
        if self.actors and self._smallest < self._largest:
            self._ask_autoscaler(0)  # the autoscaler may let the nodes go
        self.actors.clear()
        if self._owns_runtime:
            self._owns_runtime = False
            self._ray.shutdown()


def format_resources(resources: dict[str, float]) -> str:
    """{"CPU": 1.0, "memory": 2e9} -> "CPU 1, memory 2e+09": as `ray status` names them."""
    return ", ".join(f"{key} {value:g}" for key, value in sorted(resources.items()))


def raise_user_error(error: Exception) -> NoReturn:
    """A worker's task failed: the user's mistake it found (bad data...) as itself, one clear
    line, rather than wrapped in Ray's traceback; anything else as it came."""
    if isinstance(getattr(error, "cause", None), UserError):
        raise error.cause from None
    raise error


def start_group(
    plan: DataPlan,
    cluster: ClusterConfig,
    worker_class: type[ShardWorker] = ShardWorker,
    estimate_for: Callable[[DataPlan], PlanEstimate] | None = None,
    kept: KeptWorkers | None = None,
) -> WorkerGroup:
    """The group `cluster` asks for; workers that can be made to fail only for chaos runs.
    `estimate_for`: a plan's costs. On a joined cluster, the plan's memory must fit its
    nodes (exit 2); an elastic group checks it again before it shrinks."""
    if cluster.workers == 0:
        return LocalGroup(plan, worker_class)
    if cluster.inject_failure:
        worker_class = ChaosWorker
    started = connect_ray(
        cluster.address, cluster.largest * cluster.cpus_per_worker, code_to_ship(cluster)
    )
    try:
        if cluster.address is not None:
            check_joined_cluster(cluster, estimate_for and estimate_for(plan))
        return RayGroup(
            plan,
            cluster.cpus_per_worker,
            owns_runtime=started,
            policy=FailurePolicy(cluster.max_worker_failures),
            timeout=cluster.step_timeout,
            start_timeout=cluster.start_timeout,
            placement=cluster.placement,
            resources=cluster.worker_resources,
            # Ray Client cannot run compiled graphs: plain calls, without trying
            transport="plain"
            if (cluster.address or "").startswith("ray://")
            else cluster.transport,
            worker_class=worker_class,
            sizes=(cluster.smallest, cluster.largest),
            replace_timeout=cluster.replace_timeout,
            estimate_for=estimate_for,
            kept=kept,
        )
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise


def check_joined_cluster(cluster: ClusterConfig, estimate: PlanEstimate | None) -> None:
    """Memory the nodes do not have stops the run (exit 2); room Ray cannot find now is only
    said, since an autoscaler may add the nodes while the workers wait for them."""
    import ray

    nodes = ray_nodes(ray)
    if estimate is not None and (problem := memory_problem(estimate, nodes)):
        raise ConfigError(problem)
    if problem := placement_problem(worker_request(cluster), cluster.workers, nodes):
        log.warning(
            "%s; waiting up to %.0f s for nodes to join (cluster.start_timeout)",
            problem,
            cluster.start_timeout,
        )
