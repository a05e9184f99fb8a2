"""The parameters a step sends reach the workers of a node as one copy in Ray's shared
memory, which each worker reads in place (never a copy per worker), by plain calls
(the object store) and through the compiled graph (its channel) alike."""

from pathlib import Path

import numpy as np
import pytest

from shardprop.workers.shard import ShardWorker
from tests.groups import prepared

WORKERS = 3


def memory_home(array: np.ndarray) -> tuple[bool, tuple | None]:
    """Whether `array` may be written, and the shared file mapping that holds its first
    byte as (device, inode, offset in the file); None for this process's private memory
    (Linux: /proc/self/maps)."""
    address = array.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms, offset, device, inode = line.split()[:5]
        low, high = (int(bound, 16) for bound in span.split("-"))
        if low <= address < high:
            shared = perms[3] == "s" and inode != "0"
            where = (device, int(inode), int(offset, 16) + address - low) if shared else None
            return array.flags.writeable, where
    raise AssertionError("the array's address is in no mapping")


@pytest.mark.parametrize("transport", ["plain", "compiled"])
def test_the_workers_of_a_node_read_one_shared_copy_of_the_parameters(ray_session, transport):
    class Recording(ShardWorker):
        """Where each step's parameters lay in this worker's memory."""

        homes: tuple = ()

        def gradient(self, theta: np.ndarray):
            self.homes = (*self.homes, memory_home(theta))
            return super().gradient(theta)

    group, theta = prepared(
        WORKERS,
        "model.hidden=[256, 256]",
        worker_class=Recording,
        **{"cluster.transport": transport},
    )
    try:
        assert theta.nbytes > 500_000  # far above what Ray passes inline with a call
        group.compile()
        steps = 3  # the first by plain calls, the rest through the graph where compiled
        for _ in range(steps):
            group.call("gradient", theta)
        import ray

        seen = ray.get([a.__ray_call__.remote(lambda w: w.homes) for a in group.actors])
    finally:
        group.close()
    assert all(len(homes) == steps for homes in seen)
    for step in range(steps):
        homes = {homes[step] for homes in seen}
        assert len(homes) == 1, homes  # the same bytes of the same shared file for all
        ((writeable, where),) = homes
        assert where is not None and not writeable, homes
