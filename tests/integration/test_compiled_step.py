"""The step through a Ray Compiled Graph: the same bits as plain actor calls, and a worker
killed behind the group's back is replaced as with plain calls."""

import numpy as np
import pytest

from shardprop.service.cluster.group import RayGroup, asleep_for
from shardprop.service.training.reduce import reduce_sums
from tests.groups import kill_and_wait, prepared

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def prepared_group(compiled: bool, workers: int = 2) -> tuple[RayGroup, np.ndarray]:
    return prepared(workers, **{"cluster.transport": "compiled" if compiled else "plain"})


def test_compiled_and_plain_calls_return_the_same_bits(ray_session):
    # 2 + 2 workers: the test session offers 4 CPUs
    compiled, theta = prepared_group(compiled=True)
    plain, _ = prepared_group(compiled=False)
    try:
        # without a graph compiled ahead, the first two steps take the plain road: the first
        # touches the workers' buffers, the second times the math
        compiled.call("gradient", theta)
        compiled.call("gradient", theta)
        assert compiled._step is None
        for _ in range(3):  # the channels are reused from step to step
            fast, slow = compiled.call("gradient", theta), plain.call("gradient", theta)
            assert compiled._step is not None  # it did take the compiled road
            a, b = reduce_sums(fast), reduce_sums(slow)
            assert np.array_equal(a.grad, b.grad) and a.loss == b.loss
            assert (a.rows, a.correct) == (b.rows, b.correct)
    finally:
        compiled.close()
        plain.close()


def torch_flag(_: object) -> bool | None:
    from ray.experimental.channel.common import ChannelContext

    return ChannelContext.get_current()._torch_available


def test_a_graph_compiled_before_the_loop_serves_every_compiled_step(ray_session):
    compiled, theta = prepared_group(compiled=True)
    plain, _ = prepared_group(compiled=False)
    try:
        compiled.prepare_steps(theta)  # as the trainer does: compiling is not a step's cost
        graph = compiled._step
        assert graph is not None
        # the first step too takes the graph: a plain call would run beside its spinning
        # readers
        served = []
        through_graph = compiled._call_compiled

        def recording(*args, **kwargs):
            results = through_graph(*args, **kwargs)
            served.append(results is not None)
            return results

        compiled._call_compiled = recording
        for _ in range(3):
            fast, slow = compiled.call("gradient", theta), plain.call("gradient", theta)
            assert compiled._step is graph
            assert np.array_equal(reduce_sums(fast).grad, reduce_sums(slow).grad)
        assert served == [True, True, True]
        plain.prepare_steps(theta)  # nothing to compile on the plain road
        assert plain._step is None
    finally:
        compiled.close()
        plain.close()


def test_the_graph_takes_the_driver_actor_started_beside_the_workers(ray_session):
    """Ray's compile would start its driver-side actor itself, without waiting for it: its
    process's start-up would then run in the loop's first steps."""
    group, theta = prepared_group(compiled=True)
    plain, _ = prepared_group(compiled=False)
    try:
        proxy = group._driver_proxy
        assert proxy is not None and plain._driver_proxy is None
        group.prepare_steps(theta)
        assert group._step._graph._proxy_actor == proxy
        kill_and_wait(ray_session, group.actors[0])
        group.call("gradient", theta)  # the plain road replaces the worker
        group.call("gradient", theta)  # the replacement's first step is not timed
        group.call("gradient", theta)  # compiled anew, with the same driver-side actor
        assert group._step._graph._proxy_actor == proxy
    finally:
        group.close()
        plain.close()


def test_the_driver_reads_the_graphs_results_from_the_compile_on(ray_session):
    """Else a worker lost before the first step crashed the whole driver: Ray's teardown
    registered it as a reader of a buffer already freed with the worker (a RAY_CHECK in
    Ray's C++, exit code 1, seen in CI in the test above)."""
    group, theta = prepared_group(compiled=True)
    try:
        group.prepare_steps(theta)
        channels = group._step._graph.dag_output_channels
        assert len(channels) == 2
        assert all(channel._reader_registered for channel in channels)
    finally:
        group.close()


def test_the_first_step_is_not_taken_for_the_steps_time(ray_session):
    """It touches the workers' buffers first; the step after it may have spun beside them
    the whole time, so the coordinator sleeps through half of it only."""
    group, theta = prepared_group(compiled=True)
    try:
        group.prepare_steps(theta)
        group.call("gradient", theta)
        assert not group._computes and group._expected() == 0.0
        second = group.call("gradient", theta)
        assert list(group._computes) == [max(r.seconds for r in second)]
        assert group._expected() == asleep_for(group._computes[0]) / 2
        group.call("gradient", theta)
        assert group._expected() == asleep_for(min(group._computes))
    finally:
        group.close()


def test_the_compiled_step_spares_the_workers_importing_torch(ray_session):
    """Ray's channels import torch in every actor on the first step where it is installed
    (seconds); ours carry numpy only and are told so."""
    group, theta = prepared_group(compiled=True)
    try:
        for _ in range(3):
            group.call("gradient", theta)
        assert group._step is not None
        flags = ray_session.get([a.__ray_call__.remote(torch_flag) for a in group.actors])
        assert flags == [False, False]
    finally:
        group.close()


def test_a_worker_killed_between_compiled_steps_is_replaced(ray_session):
    group, theta = prepared_group(compiled=True)
    try:
        group.call("gradient", theta)  # on the plain road, twice: the next one compiles
        group.call("gradient", theta)
        before = reduce_sums(group.call("gradient", theta))
        assert group._step is not None
        kill_and_wait(ray_session, group.actors[1])  # the graph learns it on its next step
        after = reduce_sums(group.call("gradient", theta))
        assert group.restarts == 1
        assert np.array_equal(after.grad, before.grad)
        again = reduce_sums(group.call("gradient", theta))  # compiled anew, for the replacement
        assert group._step is not None
        assert np.array_equal(again.grad, before.grad)
    finally:
        group.close()


@pytest.mark.parametrize(
    "transport", ["compiled", "plain", "compiled, a worker lost", "plain, a worker lost"]
)
def test_the_callers_own_work_runs_once_per_step_on_either_transport(ray_session, transport):
    """The trainer logs a step's metrics while the next step computes: a compiled step that
    gives up and hands the step on to plain calls must not log them twice."""
    group, theta = prepared_group(compiled=transport.startswith("compiled"))
    ran = []
    try:
        group.call("gradient", theta)  # the first steps time the math on plain calls
        reference = reduce_sums(group.call("gradient", theta))
        if transport.endswith("lost"):
            kill_and_wait(ray_session, group.actors[1])
        for step in range(3):
            parts = group.call("gradient", theta, meanwhile=lambda step=step: ran.append(step))
            assert ran == list(range(step + 1))
            assert np.array_equal(reduce_sums(parts).grad, reference.grad)
        assert group.restarts == transport.endswith("lost")
        assert (group._step is not None) == transport.startswith("compiled")
    finally:
        group.close()


def test_in_process_the_callers_own_work_comes_first():
    group, theta = prepared(0)
    order = []
    group.workers[0].gradient = lambda theta: order.append("gradient")
    group.call("gradient", np.zeros_like(theta), meanwhile=lambda: order.append("own"))
    assert order == ["own", "gradient"]
