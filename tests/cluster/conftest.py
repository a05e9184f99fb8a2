"""What the tests that lose a node share: two fresh `ray start` nodes with one `shard_slot`
each."""

import pytest

from tests.processes import RayCluster


@pytest.fixture
def cluster():
    """Two nodes of their own for one test, which may stop one of them."""
    with RayCluster.running({"RAY_AUTH_MODE": "disabled"}, resources={"shard_slot": 1}) as cluster:
        yield cluster
