"""What the tests that lose a node share: two fresh `ray start` nodes with one `shard_slot`
each."""

import pytest

from tests.processes import RayCluster


@pytest.fixture
def cluster():
    """Two nodes of their own for one test, which may stop one of them."""
    cluster = RayCluster({"RAY_AUTH_MODE": "disabled"}, resources={"shard_slot": 1})
    try:
        cluster.start(nodes=2)
        yield cluster
    finally:
        cluster.stop()
