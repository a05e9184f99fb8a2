"""The worker group: k ShardWorkers, in this process or as Ray actors, behind one interface.

The training loop only calls `call(method, *args)` and gets the results in rank order, so it
never imports Ray, and `--workers 0` runs the very same loop in-process.
"""

import contextlib
import functools
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np

from shardprop.service.cluster import local_ray
from shardprop.service.cluster.auth import TOKEN_VARIABLE, check_token
from shardprop.service.cluster.compiled import (
    BrokenStepError,
    CompiledStep,
    compile_step,
    start_driver_proxy,
)
from shardprop.service.cluster.policy import WHEN, Decision, FailurePolicy, InjectedFailure
from shardprop.service.config import ClusterConfig
from shardprop.service.data.plan import DataPlan
from shardprop.service.errors import ConfigError, TrainingError
from shardprop.service.shipped_code import stage
from shardprop.workers.errors import UserError
from shardprop.workers.shard import ShardWorker

# calls that build a worker's state: replayed, in order, on a replacement worker
STATE_METHODS = ("load", "prepare")
SPIN_MARGIN_SHARE = 0.01  # of a step's compute, left awake before the sums are due
SPIN_MARGIN_SECONDS = 0.3e-3


class WorkerGroup(Protocol):
    size: int
    restarts: int  # workers replaced so far

    def call(
        self, method: str, *args: Any, meanwhile: Callable[[], None] | None = None
    ) -> list[Any]:
        """Run a ShardWorker method on every worker; results in rank order. `meanwhile`:
        the caller's own work, done once while the workers compute."""

    def inject(self, failure: InjectedFailure) -> None:
        """Arm a chaos failure: the next `gradient` calls on that worker kill its process."""

    def prepare_steps(self, theta: np.ndarray, method: str = "gradient") -> None:
        """Set up the transport the `method` calls take, before the loop that makes them."""

    def close(self) -> None:
        """Stop the workers (and a Ray runtime the group started); safe to call twice."""


class LocalGroup:
    """One ShardWorker holding every row, in this process: the reference run."""

    def __init__(self, plan: DataPlan):
        self.workers = [
            ShardWorker(
                0, plan.source, plan.features, plan.label, 0, plan.total_rows, grid=plan.grid
            )
        ]
        self.size = 1
        self.restarts = 0

    def call(
        self, method: str, *args: Any, meanwhile: Callable[[], None] | None = None
    ) -> list[Any]:
        if meanwhile is not None:
            meanwhile()  # nothing runs beside this process's own workers: first, then
        return [getattr(worker, method)(*args) for worker in self.workers]

    def inject(self, failure: InjectedFailure) -> None:
        raise ConfigError("--inject-failure kills a worker process: it needs --workers 1 or more")

    def prepare_steps(self, theta: np.ndarray, method: str = "gradient") -> None:
        pass  # in-process calls have no transport to set up

    def close(self) -> None:
        self.workers.clear()


class RayGroup:
    """One Ray actor per shard, each with `cpus_per_worker` CPUs and as many BLAS threads.

    A worker whose process dies (or that does not answer within `timeout` seconds) is
    replaced by a new actor that rebuilds the same state from the same calls, and the call is
    made again, as long as the failure policy allows.
    """

    def __init__(
        self,
        plan: DataPlan,
        cpus_per_worker: int,
        owns_runtime: bool,
        policy: FailurePolicy | None = None,
        timeout: float | None = None,
        placement: str = "spread",
        resources: dict[str, float] | None = None,
        transport: str = "compiled",
    ):
        import ray

        self._ray = ray
        self._actor = ray.remote(ShardWorker).options(
            num_cpus=cpus_per_worker,
            resources=resources or {},
            scheduling_strategy="SPREAD" if placement == "spread" else "DEFAULT",
        )
        self._spawn_args = [
            (rank, plan.source, plan.features, plan.label, start, stop, cpus_per_worker, plan.grid)
            for rank, (start, stop) in enumerate(plan.shards)
        ]
        self.actors = [self._actor.remote(*args) for args in self._spawn_args]
        self.size = len(self.actors)
        self._shards = plan.shards
        self._owns_runtime = owns_runtime
        self._policy = policy or FailurePolicy(max_failures=0)
        self._timeout = timeout
        self._state_calls: list[tuple[str, tuple]] = []
        self._armed: dict[int, list[str]] = {}  # rank -> methods to call instead of gradient
        # the step through a compiled graph, when possible: a compile can fail for a worker
        # that died just before it, so a replaced worker gets it tried again
        self._transport = self._wanted_transport = transport
        self._step_method = "gradient"  # the calls that take the transport
        self._step: CompiledStep | None = None
        self._driver_proxy = start_driver_proxy(ray) if transport == "compiled" else None
        # the slowest worker's compute in the last two steps: the compiled step sleeps
        # through all but a margin of the smaller (a one-off slow step must not make the next
        # one wait), then spins for the sums. A worker's first step is not one of them: it
        # touches its buffers for the first time (3.3 s against 1.0 s on the standard
        # workload, and the next step slept as long)
        self._computes: deque[float] = deque(maxlen=2)
        self._cold = True  # no step yet since the workers (or a replacement) started

    @property
    def restarts(self) -> int:
        return self._policy.restarts

    def call(
        self, method: str, *args: Any, meanwhile: Callable[[], None] | None = None
    ) -> list[Any]:
        # once: a compiled step that gives up hands the call on to plain calls
        meanwhile = functools.cache(meanwhile or (lambda: None))
        # an armed chaos failure takes plain calls
        stepping = method == self._step_method
        # without a graph compiled ahead (prepare_steps), steps take plain calls until one
        # is timed: a graph compiled now would have its reader spin a core the whole step.
        # With one, the actors already spin on its channels
        compiled = self._transport == "compiled" and (self._computes or self._step is not None)
        if stepping and compiled and not any(self._armed.values()):
            results = self._call_compiled(method, args, meanwhile)
            if results is not None:
                return results
        args = self._broadcast(args)
        results: dict[int, Any] = {}
        pending = {rank: self._submit(rank, method, args) for rank in range(self.size)}
        meanwhile()
        while pending:
            lost = {}
            for rank, future in pending.items():
                try:
                    results[rank] = self._ray.get(future, timeout=self._timeout_for(method))
                except self._ray.exceptions.RayTaskError as error:
                    raise_user_error(error)
                except self._ray.exceptions.RayActorError:
                    lost[rank] = "its process died"
                except self._ray.exceptions.GetTimeoutError:
                    lost[rank] = f"no answer within {self._timeout} s"
            pending = {}
            for rank, reason in lost.items():
                self._recover(rank, method, reason)
                pending[rank] = self._submit(rank, method, args)
        if method in STATE_METHODS:
            self._state_calls.append((method, args))
        in_order = [results[rank] for rank in range(self.size)]
        if stepping:
            self._timed(in_order)
        return in_order

    def _broadcast(self, args: tuple) -> tuple:
        """One object-store copy per array, shared by every worker."""
        return tuple(self._ray.put(a) if isinstance(a, np.ndarray) else a for a in args)

    def _call_compiled(
        self, method: str, args: tuple, meanwhile: Callable[[], None]
    ) -> list[Any] | None:
        """The call through the compiled graph; None when it could not be made (no graph, or
        a failure on it): plain calls then make it, and find any dead worker."""
        if not self._open(method, args[0]):
            return None
        try:
            expected = self._expected()
            results = self._step(
                *args, timeout=self._timeout, expected=expected, meanwhile=meanwhile
            )
        except BrokenStepError as broken:
            # the others' results went with the graph: plain calls redo the step
            if broken.silent is None:
                self._drop_step()
            else:
                self._recover(broken.silent, method, broken.reason)  # drops the graph too
            return None
        except self._ray.exceptions.RayTaskError as error:
            raise_user_error(error)
        self._timed(results)
        return results

    def prepare_steps(self, theta: np.ndarray, method: str = "gradient") -> None:
        """Compile the graph for `method` calls now, not in a step of the loop."""
        self._step_method = method
        if self._transport == "compiled":
            self._open(method, theta)

    def _expected(self) -> float:
        """How long the compiled step sleeps before it reads the sums. With one step timed,
        half as long: that step may have spun for its whole time beside the workers, whose
        compute it then slowed (1.29 s against 1.02 s on the standard workload)."""
        if len(self._computes) < 2:
            return asleep_for(self._computes[0]) / 2 if self._computes else 0.0
        return asleep_for(min(self._computes))

    def _timed(self, results: list[Any]) -> None:
        if self._cold:
            self._cold = False
        else:
            self._computes.append(max(r.seconds for r in results))

    def _ready_for(self, method: str) -> bool:
        return self._step is not None and self._step.method == method

    def _open(self, method: str, theta: np.ndarray) -> bool:
        """A compiled graph for `method` is ready; False where none can be had."""
        if not self._ready_for(method):
            self._drop_step()  # an actor serves one graph at a time
            self._step = compile_step(
                self._ray, self.actors, method, 2 * theta.nbytes + 2**20, self._driver_proxy
            )
            if self._step is None:
                self._transport = "plain"
        return self._step is not None

    def _drop_step(self) -> None:
        if self._step is not None:
            self._step.close()
            self._step = None

    def _timeout_for(self, method: str) -> float | None:
        return None if method in STATE_METHODS else self._timeout  # reading data takes long

    def _submit(self, rank: int, method: str, args: tuple) -> Any:
        if method == "gradient" and self._armed.get(rank):
            method = self._armed[rank].pop(0)
        return getattr(self.actors[rank], method).remote(*args)

    def _recover(self, rank: int, method: str, reason: str) -> None:
        self._ray.kill(self.actors[rank])  # a hung worker must not linger, nor be waited for
        self._drop_step()  # compiled for the lost actor: compiled again for its replacement
        self._transport = self._wanted_transport
        self._cold = True
        start, stop = self._shards[rank]
        if self._policy.on_lost(rank, reason) is Decision.RAISE:
            raise TrainingError(
                f"worker {rank} (rows {start}..{stop}) was lost during {method}() ({reason}); "
                f"{len(self._policy.failures)} failures are more than "
                f"cluster.max_worker_failures={self._policy.max_failures}"
            )
        logging.getLogger(__name__).warning(
            "worker %d (rows %d..%d) lost during %s() (%s): replacing it",
            rank,
            start,
            stop,
            method,
            reason,
        )
        actor = self._actor.remote(*self._spawn_args[rank])
        for state_method, state_args in self._state_calls:  # the same rows, the same state
            self._ray.get(getattr(actor, state_method).remote(*state_args))
        self.actors[rank] = actor

    def inject(self, failure: InjectedFailure) -> None:
        if not 0 <= failure.worker < self.size:
            raise ConfigError(
                f"--inject-failure worker={failure.worker}: ranks are 0..{self.size - 1}"
            )
        self._armed[failure.worker] = [WHEN[failure.when]] * failure.times

    def close(self) -> None:
        self._drop_step()
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors.clear()
        if self._driver_proxy is not None:
            self._ray.kill(self._driver_proxy)
            self._driver_proxy = None
        if self._owns_runtime:
            self._owns_runtime = False
            self._ray.shutdown()


def asleep_for(compute: float) -> float:
    """How long the coordinator sleeps through a step whose slowest worker computed for
    `compute` seconds in the faster of the last two steps. Spinning for the sums takes a core
    from the workers when they fill every core (and costs them more than its own CPU: each
    yield is a context switch on a worker's core), so the margin is small: 1 % of a step (a
    1 s step came in up to 0.8 % under that prediction, up to 1.6 % over), at least 0.3 ms
    (a 3 ms step's varies by about 0.2 ms). Measured on the standard workload, steps
    alternating in one run: 968 and 977 ms with a 3 % margin, 959 and 972 ms with 1 %."""
    return compute - max(SPIN_MARGIN_SECONDS, SPIN_MARGIN_SHARE * compute)


def raise_user_error(error: Exception) -> NoReturn:
    """A worker's task failed: the user's mistake it found (bad data...) as itself, one clear
    line, rather than wrapped in Ray's traceback; anything else as it came."""
    if isinstance(getattr(error, "cause", None), UserError):
        raise error.cause from None
    raise error


def code_to_ship(cluster: ClusterConfig) -> tuple[str, ...]:
    """The parts of this version of shardprop that the nodes get through runtime_env, if any.

    Workers import only `shardprop.workers` (the math) and its numpy/pyarrow/threadpoolctl;
    shipped modules come first on the workers' sys.path, so a node with another shardprop
    installed still runs the coordinator's version.
    """
    ship = cluster.ship_code
    if ship == "never" or (ship == "auto" and cluster.address is None):
        return ()
    return ("workers",)


def connect_ray(
    address: str | None,
    cpus_needed: int,
    ship: tuple[str, ...] = (),
    lean: bool = True,
) -> bool:
    """Join the cluster at `address`, or start Ray on this machine when there is none.

    A local start declares at least as many CPUs as the workers ask for, so `--workers 3`
    runs on a 2-core laptop (oversubscribed) instead of waiting forever for a free CPU, and
    (`lean`) starts only the processes a run uses (`service.local_ray`).
    Returns whether this call started (or joined) the runtime, and so should shut it down.
    """
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    lean_start = lean and address is None
    if address is None:
        options["num_cpus"] = max(os.cpu_count() or 1, cpus_needed)
        if lean_start:
            options["_system_config"] = local_ray.SYSTEM_CONFIG
    else:
        options["address"] = address
        check_token(address)
    try:
        with (
            local_ray.quick_start() if lean_start else contextlib.nullcontext(),
            tempfile.TemporaryDirectory(prefix="shardprop-code-") as folder,
        ):
            if ship:  # uploaded by ray.init, so the copy may go once it returns
                options["runtime_env"] = {"py_modules": [str(stage(Path(folder), ship))]}
            ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        if address is None:
            raise
        raise ConfigError(unreachable_cluster(address, error)) from None
    return True


def unreachable_cluster(address: str, error: Exception) -> str:
    """One line for a cluster this client cannot join."""
    text = " ".join(str(error).split())
    return (
        f"cluster.address: cannot join the Ray cluster at {address}: {text[:300]} "
        f"(is it up, and does it need a token? {TOKEN_VARIABLE} sets one)"
    )


def start_group(plan: DataPlan, cluster: ClusterConfig) -> WorkerGroup:
    if cluster.workers == 0:
        return LocalGroup(plan)
    started = connect_ray(
        cluster.address, cluster.workers * cluster.cpus_per_worker, code_to_ship(cluster)
    )
    return RayGroup(
        plan,
        cluster.cpus_per_worker,
        owns_runtime=started,
        policy=FailurePolicy(cluster.max_worker_failures),
        timeout=cluster.step_timeout,
        placement=cluster.placement,
        resources=cluster.worker_resources,
        transport=cluster.transport,
    )
