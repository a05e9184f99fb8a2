"""A run's own local Ray runtime: started without the processes a run does not use, and
without Ray's once-a-second wait for the raylet; every other start stays as Ray makes it.

In a child process each (the test session's runtime is already up in this one).
"""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# the process types Ray started, for a lean start and then a plain ray.init in one process
CHILD = """
import json, time
import ray
from ray._private import node
from service.group import connect_ray

def started(start):
    began = time.perf_counter()
    start()
    seconds = time.perf_counter() - began
    kinds = sorted(ray._private.worker._global_node.all_processes)

    @ray.remote(num_cpus=1)
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    ray.shutdown()
    return {"seconds": seconds, "processes": kinds}

original = node.Node.start_api_server
lean = started(lambda: connect_ray(None, 2))
assert node.Node.start_api_server is original, "the lean start left Ray changed"
plain = started(lambda: connect_ray(None, 2, lean=False))
print(json.dumps({"lean": lean, "plain": plain}))
"""


@pytest.fixture(scope="module")
def starts():
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_runs_own_runtime_starts_without_the_api_server_and_the_autoscaler(starts):
    assert {"dashboard", "monitor"} <= set(starts["plain"]["processes"])
    assert not {"dashboard", "monitor"} & set(starts["lean"]["processes"])
    assert {"gcs_server", "raylet"} <= set(starts["lean"]["processes"])  # and it worked


def test_a_runs_own_runtime_starts_in_well_under_the_time_of_a_plain_start(starts):
    """Measured on 2 cores: 1.2-1.4 s against 2.3-3.3 s."""
    assert starts["lean"]["seconds"] < 0.8 * starts["plain"]["seconds"], starts
