"""Starting Ray on this machine for one run: the processes a run uses, and no waiting in
whole seconds.

`ray.init()` on a 2-core machine took 2.2-3.6 s, of which a run needs about 1.3 s (measured
beside MLflow's start-up: 3.6 s against 1.6 s). The rest is four things Ray does on every
local start:

- it starts the dashboard's API server even with `include_dashboard=False` (where that
  server loads only the usage-statistics module) and waits about a second for it to come up,
  before it starts the raylet;
- it starts the autoscaler's monitor, which has nothing to scale on a fixed local node;
- it waits for the raylet to register through a GCS call that polls once a second (Ray's
  C++ `GetNode`), so a raylet ready after 0.5 s is seen after 1 s, and one ready after
  1.1 s after 2 s;
- about one start in two, the raylet's first connection to its own object store comes a
  moment too early, and its retry waits a whole second (`raylet_client_connect_timeout_
  milliseconds`, 1000 ms, times `raylet_client_num_connect_attempts`, 10).

Two more cost the run CPU for as long as it lasts, which on a machine whose cores all
compute is taken from the workers (a step waits for the slowest):

- the log monitor, a Python process that reads the workers' log files over and over to
  echo them on the driver's console (0.3 s of CPU at the start, then about 0.5 % of a core);
  our workers write nothing there: their errors come back as exceptions, and anything else
  they print stays in Ray's session logs (`/tmp/ray/session_latest/logs`);
- Ray's own metrics, recorded by every Ray process on a timer for a dashboard and a
  Prometheus that a run's local start has neither of (about 0.7 % of a core in all).

`quick_start()` skips the first two processes and the log monitor, and watches the node
table every 10 ms instead; the start's `SYSTEM_CONFIG` retries connections every 20 ms, 500
times (the same 10 s in all), and records no metrics.

It also runs the workers at the driver's priority. Ray nices its workers to 15 so that its
own processes come first; at 15 a worker gets about 1/30 of a core that any process at 0
also wants (the coordinator spinning for the sums, Ray's agents), and a step waits for its
slowest worker. With niceness 0, 2 workers' steps on the standard workload took 2-3 % less
(977 against 1000 ms, 1016 against 1034, 1029 against 1059, pairs run alternately). Ray's
own job supervisor sets the same (`RAY_worker_niceness=0`).

All of this is for the `ray.init()` of a runtime this process starts and owns (never for a cluster
joined with an address). `quick_start()` changes only what Ray still has (with a Ray that
moved its internals, Ray starts the way it always does); the config keys are Ray's own
and long-standing. No library offers this; Ray's own switches for it (`ray start
--no-monitor`) are not exposed to `ray.init`.
"""

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

log = logging.getLogger(__name__)
REGISTRATION_POLL = 0.01  # seconds between looks at the node table
REGISTRATION_WAIT = 30.0  # Ray's own limit (raylet_start_wait_time_s)
SYSTEM_CONFIG = {
    "raylet_client_connect_timeout_milliseconds": 20,
    "raylet_client_num_connect_attempts": 500,
    "enable_metrics_collection": False,
    "worker_niceness": 0,
}


@contextlib.contextmanager
def quick_start() -> Iterator[None]:
    """Inside: a `ray.init()` that starts a local runtime starts only what a run uses."""
    try:
        from ray._private import node, services
    except ImportError:  # Ray moved its internals: start it as it is
        yield
        return
    changes = [
        (node.Node, "start_api_server", skip),
        (node.Node, "start_monitor", skip),
        (node.Node, "start_log_monitor", skip),
        (services, "get_node", polling(getattr(services, "get_node", None))),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, replacement in changes:
            if callable(getattr(owner, name, None)):
                stack.enter_context(mock.patch.object(owner, name, replacement))
        yield


def skip(*_: Any, **__: Any) -> None:
    """A process the run does not use, not started."""


def polling(get_node: Callable[[str, str], Any] | None) -> Callable[[str, str], Any]:
    """Ray's `get_node(gcs_address, node_id)`, called once the node table lists the node."""

    def get_node_when_registered(gcs_address: str, node_id: str) -> Any:
        try:
            wait_for_registration(gcs_address, node_id)
        except Exception as error:  # Ray's internals moved: its own wait still works
            log.debug("watching the node table failed: %s", error)
        return get_node(gcs_address, node_id)

    return get_node_when_registered


def wait_for_registration(gcs_address: str, node_id: str) -> None:
    from ray._private import services, state

    table = state.GlobalState()
    table._initialize_global_state(services._get_gcs_client_options(gcs_address))
    try:
        deadline = time.monotonic() + REGISTRATION_WAIT
        while time.monotonic() < deadline:
            if any(entry["NodeID"] == node_id for entry in table.node_table()):
                return
            time.sleep(REGISTRATION_POLL)
    finally:
        table.disconnect()
