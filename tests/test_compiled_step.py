"""The gradient through a Ray Compiled Graph: the same bits as plain actor calls, and a worker
killed behind its back is replaced as on the plain road."""

import numpy as np
import pytest

from service.config import load_config
from service.group import RayGroup, start_group
from service.prepare import decide
from service.trainer import make_plan
from workers.network import Architecture
from workers.params import init_params

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SETS = ["data.synthetic={name: blobs, rows: 1001, seed: 4}", "model.hidden=[16, 8]"]


def prepared_group(compiled: bool, workers: int = 2) -> tuple[RayGroup, np.ndarray]:
    config = load_config(
        None, SETS, {"cluster.workers": workers, "cluster.compiled_graph": compiled}
    )
    plan = make_plan(config)
    group = start_group(plan, config.cluster)
    setup = decide(group.call("load", 0.0, 0), plan.features, config.data)
    arch = Architecture((len(plan.features), 16, 8, setup.outputs), "relu", setup.task)
    group.call("prepare", arch, "float64", setup.classes, setup.mean, setup.std)
    return group, init_params(arch.layout, "he", 0, "float64")


def test_compiled_and_plain_calls_return_the_same_bits(ray_session):
    # 2 + 2 workers: the test session offers 4 CPUs
    compiled, theta = prepared_group(compiled=True)
    plain, _ = prepared_group(compiled=False)
    try:
        for _ in range(3):  # the channels are reused from step to step
            fast, slow = compiled.call("gradient", theta), plain.call("gradient", theta)
            assert compiled._step is not None  # it did take the compiled road
            for a, b in zip(fast, slow, strict=True):
                assert np.array_equal(a.grad, b.grad) and a.loss == b.loss
                assert (a.rows, a.correct) == (b.rows, b.correct)
    finally:
        compiled.close()
        plain.close()


def test_a_worker_killed_between_compiled_steps_is_replaced(ray_session):
    group, theta = prepared_group(compiled=True)
    try:
        before = group.call("gradient", theta)
        ray_session.kill(group.actors[1])  # out of band: the graph learns it on its next step
        after = group.call("gradient", theta)
        assert group.restarts == 1
        for a, b in zip(before, after, strict=True):
            assert np.array_equal(a.grad, b.grad)
        again = group.call("gradient", theta)  # compiled anew, for the replacement
        assert group._step is not None
        assert all(np.array_equal(a.grad, b.grad) for a, b in zip(before, again, strict=True))
    finally:
        group.close()
