"""The step through a Ray Compiled Graph: the same bits as plain actor calls, and a worker
killed behind the group's back is replaced as with plain calls."""

import time

import numpy as np
import pytest

from shardprop.service.cluster.group import RayGroup
from shardprop.service.training.reduce import reduce_sums
from tests.groups import kill_and_wait, prepared

pytestmark = pytest.mark.slow


def prepared_group(transport: str, *sets: str) -> tuple[RayGroup, np.ndarray]:
    return prepared(2, *sets, **{"cluster.transport": transport})


def same_sums(a: list, b: list) -> bool:
    a, b = reduce_sums(a), reduce_sums(b)
    return (
        np.array_equal(a.grad, b.grad)
        and np.array_equal(a.tallies, b.tallies)
        and (a.loss, a.rows, a.correct) == (b.loss, b.rows, b.correct)
    )


@pytest.mark.parametrize("hidden", ["[16, 8]", "[512, 256]"])
def test_compiled_and_plain_calls_return_the_same_bits(ray_session, hidden):
    """[512, 256]: parameters and sums larger than a channel's first buffer, which grows."""
    compiled, theta = prepared_group("compiled", f"model.hidden={hidden}")
    plain, _ = prepared_group("plain", f"model.hidden={hidden}")
    try:
        assert theta.nbytes > 2**20 or hidden == "[16, 8]"
        for step in range(3):  # plain calls first, then compiled, then its channels reused
            fast, slow = compiled.call("gradient", theta), plain.call("gradient", theta)
            assert (compiled._graph is not None) == (step > 0) and plain._graph is None
            assert same_sums(fast, slow)
    finally:
        compiled.close()
        plain.close()


def test_a_graph_compiled_before_the_loop_serves_every_step_after_the_first(ray_session):
    """The first step goes by plain calls, which sleep while the workers compute: reading
    a graph's results spins on a core, and how long to sleep first is not known yet."""
    group, theta = prepared_group("compiled")
    try:
        group.compile()  # as the trainer does: compiling is not a step's cost
        graph = group._graph
        assert graph is not None
        served = []
        through_graph = group._call_compiled

        def recording(*args, **kwargs):
            results = through_graph(*args, **kwargs)
            served.append(results is not None)
            return results

        group._call_compiled = recording
        for _ in range(3):
            group.call("gradient", theta)
            assert group._graph is graph
        assert served == [True, True]
    finally:
        group.close()


def test_a_graph_is_set_up_by_a_cheap_call_and_steps_sleep_through_the_compute(ray_session):
    """compile() makes the graph's first call (Ray's set-up in each actor) with a method
    that computes nothing; once a step is timed, the next ones sleep through all but a
    margin of the compute."""
    group, theta = prepared_group("compiled")
    try:
        group.compile()
        assert group._graph is not None and not group._computes
        assert group._expected() < 0
        first = group.call("gradient", theta)
        assert list(group._computes) == [max(r.seconds for r in first)]
        group.call("gradient", theta)
        assert 0 < group._expected() < min(group._computes)
    finally:
        group.close()


def test_a_worker_lost_right_after_the_compile_is_replaced_and_the_driver_lives(ray_session):
    """Ray's teardown after a lost worker once crashed the whole driver (exit code 1, in
    Ray's C++) when the driver had not read the graph's results yet: compile() reads a
    first, cheap call's. Three times, since that crash did not come every time."""
    group, theta = prepared_group("compiled")
    try:
        reference = group.call("gradient", theta)
        for lost in range(1, 4):
            group._drop_graph()
            group.compile()  # as the trainer does before its loop
            assert group._graph is not None
            kill_and_wait(ray_session, group.actors[lost % 2])
            time.sleep(2)  # Ray's monitor tears the broken graph down meanwhile
            assert same_sums(group.call("gradient", theta), reference)  # plain calls replace it
            assert group.restarts == lost and group._graph is None
    finally:
        group.close()


def test_a_worker_killed_between_compiled_steps_is_replaced(ray_session):
    group, theta = prepared_group("compiled")
    try:
        group.prepare_steps(theta)
        before = group.call("gradient", theta)
        kill_and_wait(ray_session, group.actors[1])  # the graph learns it on its next step
        assert same_sums(group.call("gradient", theta), before)
        assert group.restarts == 1 and group._graph is None
        again = group.call("gradient", theta)  # compiled anew, for the replacement
        assert group._graph is not None
        assert same_sums(again, before)
    finally:
        group.close()


@pytest.mark.parametrize(
    "transport", ["compiled", "plain", "compiled, a worker lost", "plain, a worker lost"]
)
def test_the_callers_own_work_runs_once_per_step_on_either_transport(ray_session, transport):
    """The trainer logs a step's metrics while the next step computes: a compiled step that
    gives up and hands the step on to plain calls must not log them twice."""
    group, theta = prepared_group(transport.split(",")[0])
    ran = []
    try:
        group.prepare_steps(theta)
        reference = group.call("gradient", theta)
        if transport.endswith("lost"):
            kill_and_wait(ray_session, group.actors[1])
        for step in range(3):
            parts = group.call("gradient", theta, while_waiting=lambda step=step: ran.append(step))
            assert ran == list(range(step + 1))
            assert same_sums(parts, reference)
        assert group.restarts == transport.endswith("lost")
        assert (group._graph is not None) == transport.startswith("compiled")
    finally:
        group.close()


def test_in_process_the_callers_own_work_comes_first():
    group, theta = prepared(0)
    order = []
    group.workers[0].gradient = lambda theta: order.append("gradient")
    group.call("gradient", np.zeros_like(theta), while_waiting=lambda: order.append("own"))
    assert order == ["own", "gradient"]
