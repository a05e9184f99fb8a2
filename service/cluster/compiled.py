"""The training step as a Ray Compiled Graph: the same actors and methods as plain actor
calls, minus Ray's scheduling of each call.

The graph sets up shared-memory channels to the actors once, then moves the parameters and
the shard sums through them every step (figures: docs/performance.md). It is only a faster
transport: a failure on it is handed back to the caller, which redoes the step with plain
calls (they find and replace a lost worker) and compiles again.
"""

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from shardprop.service.cluster.waits import interruptible

log = logging.getLogger(__name__)


class BrokenStepError(Exception):
    """The compiled step failed: a worker died, or some worker did not answer in time."""


class CompiledStep:
    """A ShardWorker method on every actor, results in rank order, through one compiled
    graph: every call goes through the workers' `call(method, args)`, so that a cheap method
    can set the graph up before the first step."""

    def __init__(self, ray: Any, actors: list[Any]):
        from ray.dag import InputNode, MultiOutputNode

        self._ray = ray
        with InputNode() as given:
            dag = MultiOutputNode([actor.call.bind(given[0], given[1]) for actor in actors])
        # Ray starts its driver-side actor here, unwaited (upstream fix: a compile option to wait)
        self._graph = dag.experimental_compile()

    def __call__(
        self,
        method: str,
        args: tuple,
        timeout: float | None,
        expected: float = 0.0,
        while_waiting: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Results in rank order. `expected`: seconds the workers will surely take;
        `while_waiting`: the caller's own work, done while they compute.

        Reading a compiled graph's results spins on a core until they are there, a core the
        workers may need: the caller sleeps through most of the step first (a full-batch
        step takes about as long as the last one).
        """
        ray = self._ray
        started = time.monotonic()
        try:
            refs = self._graph.execute(method, args)
        except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as error:
            raise BrokenStepError(type(error).__name__) from None  # shut down by a death
        if while_waiting is not None:
            while_waiting()
        if (rest := started + expected - time.monotonic()) > 0:
            time.sleep(rest)
        left = -1 if timeout is None else max(0.0, started + timeout - time.monotonic())
        try:
            # -1: no limit (not Ray's default). Copies: numpy arrays come back as views of
            # the channel's shared memory, which the next step overwrites and teardown unmaps
            return copy.deepcopy(interruptible(ray.get, refs, timeout=left))
        except ray.exceptions.RayTaskError:
            raise  # the worker's own error (bad data...): not a lost worker
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.RayChannelError,  # and its timeout
            ray.exceptions.GetTimeoutError,
        ) as error:
            raise BrokenStepError(type(error).__name__) from None

    def close(self) -> None:
        try:
            self._graph.teardown()
        except Exception as error:  # a graph broken by a dead actor may fail to tear down
            log.debug("compiled graph teardown: %s", error)


def compile_step(ray: Any, actors: list[Any], timeout: float) -> CompiledStep | None:
    """A compiled graph, its first call made: Ray sets each actor's side up then (and
    imports torch where installed: upstream fix, a numpy-only channel option), not in the
    first step. None where Ray cannot compile one (e.g. through Ray Client)."""
    try:
        graph = CompiledStep(ray, actors)
    except Exception as error:  # Ray raises many types here; plain calls always work
        log.warning("Ray Compiled Graph unavailable, using plain actor calls: %s", error)
        return None
    # read at once: once the driver reads its channels, Ray's teardown after a worker is
    # lost no longer crashes the driver process
    try:
        graph("where", (), timeout)
    except BaseException:
        graph.close()
        raise
    return graph
