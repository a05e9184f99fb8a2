"""What the tests of tests/cluster share: two `ray start` nodes with one `shard_slot` each,
started once (that takes long); a test that loses a node adds one back."""

import pytest

from tests.processes import RayCluster


@pytest.fixture(scope="package")  # stopped after the last test here, before tests/speed
def two_nodes():
    with RayCluster.running({"RAY_AUTH_MODE": "disabled"}, resources={"shard_slot": 1}) as cluster:
        yield cluster


@pytest.fixture
def cluster(two_nodes):
    """The two nodes, running at the test's start, also after an earlier test failed before
    adding back the node it stopped (a test stops the newest one, `cluster.nodes[-1]`)."""
    while len(two_nodes.running_nodes()) < 2:
        two_nodes.add_node()
    return two_nodes
