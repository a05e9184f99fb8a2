"""The training step as a Ray Compiled Graph: the same actors and the same method, minus the
per-call scheduling.

A plain actor call costs Ray 3-4 ms per step on a 2-core machine (task submission, the
object store, the scheduler's round trips); a compiled graph sets up shared-memory channels
to the actors once and then moves the parameters and the shard sums through them, for about
0.6 ms per step (measured: `shardprop bench`). It is only a faster road for the `gradient`
call: a failure on it is handed back to the caller, who recovers the worker the ordinary way
and compiles again.
"""

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

log = logging.getLogger(__name__)


class BrokenStepError(Exception):
    """The compiled road failed. `silent` is the rank that did not answer in time, if that
    was it; a dead worker breaks the whole graph, and the plain road then finds which."""

    def __init__(self, reason: str, silent: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.silent = silent


class CompiledStep:
    """`method(theta)` on every actor, results in rank order, through one compiled graph."""

    def __init__(
        self,
        ray: Any,
        actors: list[Any],
        method: str,
        buffer_bytes: int,
        driver_proxy: Any | None = None,
    ):
        """`driver_proxy`: from `start_driver_proxy`, started earlier."""
        from ray.dag import InputNode, MultiOutputNode

        self._ray = ray
        self.method = method
        ray.get([actor.__ray_call__.remote(channels_without_torch) for actor in actors])
        with InputNode() as theta:
            dag = MultiOutputNode([getattr(actor, method).bind(theta) for actor in actors])
        # the channels grow on their own when a message is bigger; start with room enough
        with handing_over(driver_proxy):
            self._graph = dag.experimental_compile(_buffer_size_bytes=buffer_bytes)
        register_driver_readers(self._graph)

    def __call__(
        self,
        theta: Any,
        timeout: float | None,
        expected: float = 0.0,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Results in rank order. `expected`: seconds the workers will surely take;
        `meanwhile`: the caller's own work, done while they compute.

        Reading a compiled graph's result spins on a core until it is there: on a machine
        whose cores all compute (2 workers on 2 cores), that steals from the workers what it
        saves. The step's cost barely changes from one step to the next (full batch, same
        shapes), so the caller sleeps through most of it first and spins only at the end.
        """
        ray = self._ray
        started = time.monotonic()
        try:
            refs = self._graph.execute(theta)
        except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as error:
            raise BrokenStepError(type(error).__name__) from None  # shut down by a death
        sent = time.monotonic()
        if meanwhile is not None:
            meanwhile()
        if (rest := sent + expected - time.monotonic()) > 0:
            time.sleep(rest)
        results = []
        # one rank at a time, so that a timeout names the worker it came from
        for rank, ref in enumerate(refs):
            left = -1 if timeout is None else max(0.0, started + timeout - time.monotonic())
            try:
                # -1: no limit (not Ray's 10 s). A copy: numpy arrays come back as views of
                # the channel's shared memory, which the next step overwrites and teardown
                # unmaps (an array left in a traceback then crashes the interpreter's exit)
                results.append(copy.deepcopy(ray.get(ref, timeout=left)))
            except ray.exceptions.RayTaskError:
                raise  # the worker's own error (bad data...): not a lost worker
            except (ray.exceptions.RayChannelTimeoutError, ray.exceptions.GetTimeoutError):
                raise BrokenStepError(f"no answer within {timeout} s", silent=rank) from None
            except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as error:
                raise BrokenStepError(type(error).__name__) from None
        return results

    def close(self) -> None:
        try:
            self._graph.teardown()
        except Exception as error:  # a graph broken by a dead actor may fail to tear down
            log.debug("compiled graph teardown: %s", error)


def register_driver_readers(graph: Any) -> None:
    """Make the driver a reader of the graph's output channels now, while their writers
    are surely alive; Ray's compile leaves that to the first read.

    A worker that dies before the first step makes Ray's monitor thread tear the graph
    down, and the teardown registers the driver as a reader first. The channel's buffer
    belongs to the dead worker and may already be gone from the object store; Ray then
    fails a RAY_CHECK and ends the whole driver process with exit code 1, no traceback
    (seen in CI, between `prepare_steps` and the first step). A registered reader holds its
    buffer, and the teardown's registration is then a no-op."""
    for channel in getattr(graph, "dag_output_channels", ()):
        channel.ensure_registered_as_reader()


def channels_without_torch(_: object) -> None:
    """Run in each actor: its channels carry numpy arrays, never torch tensors. Ray's
    channels import torch whenever it is installed, on the first step, in every actor: 1-3 s
    of a run's first step (measured on 2 cores), for nothing. Told that torch is absent,
    they take the road they take where it is not installed."""
    from ray.experimental.channel.common import ChannelContext

    ChannelContext.get_current()._torch_available = False


def start_driver_proxy(ray: Any) -> Any | None:
    """Ray's idle actor on the driver's node, which a compiled graph whose driver reads its
    results needs (`CompiledDAG.DAGDriverProxyActor`), started now rather than by the compile.

    Ray starts it when the graph is compiled and does not wait for it: its process's
    start-up (0.35 s of CPU, measured on 2 cores) then runs in the loop's first 20 steps and
    doubled their time (7-8 ms of compute against 3.2 ms on the default config). Started
    beside the workers' processes, it is ready before the loop. None where Ray has moved it:
    the compile then starts its own, as Ray always does."""
    try:
        from ray.dag.compiled_dag_node import CompiledDAG

        node = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}
        return CompiledDAG.DAGDriverProxyActor.options(label_selector=node).remote()
    except Exception as error:  # Ray's internals moved (or Ray Client, which cannot compile)
        log.debug("no driver proxy started ahead of the compile: %s", error)
        return None


@contextlib.contextmanager
def handing_over(driver_proxy: Any | None) -> Iterator[None]:
    """Inside: a compile that takes `driver_proxy` as its driver's actor (the handle is all
    Ray keeps of it) instead of starting one."""
    if driver_proxy is None:
        yield
        return
    from ray.dag.compiled_dag_node import CompiledDAG

    class Started:
        """What `DAGDriverProxyActor.options(...).remote()` gives: the actor already there."""

        def options(self, **_: Any) -> "Started":
            return self

        def remote(self) -> Any:
            return driver_proxy

    with mock.patch.object(CompiledDAG, "DAGDriverProxyActor", Started()):
        yield


def compile_step(
    ray: Any, actors: list[Any], method: str, buffer_bytes: int, driver_proxy: Any | None = None
) -> CompiledStep | None:
    """A compiled step, or None where Ray cannot compile one (e.g. through Ray Client)."""
    try:
        return CompiledStep(ray, actors, method, buffer_bytes, driver_proxy)
    except Exception as error:  # Ray raises many types here; the plain road always works
        log.warning("Ray Compiled Graph unavailable, using plain actor calls: %s", error)
        return None
