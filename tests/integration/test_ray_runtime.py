"""A run's own local Ray runtime: started with at least the CPUs its workers ask for, and
left alone where Ray already runs.

In a child process (the test session's runtime is already up in this one).
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CHILD = """
import json, os
import ray
from shardprop.service.cluster.runtime import connect_ray

started = connect_ray(None, os.cpu_count() + 3)
cpus = ray.cluster_resources()["CPU"]
again = connect_ray(None, 1)
ray.shutdown()
print(json.dumps({"started": started, "cpus": cpus, "again": again, "cores": os.cpu_count()}))
"""


def test_a_local_start_declares_the_cpus_the_workers_ask_for_and_owns_the_runtime():
    """More workers than cores are oversubscribed, not left waiting for a CPU forever."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["started"] is True  # this run started it, so it shuts it down
    assert seen["cpus"] == seen["cores"] + 3
    assert seen["again"] is False  # a runtime already up is not this call's to shut down
