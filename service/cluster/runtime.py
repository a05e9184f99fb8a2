"""The Ray runtime a run uses: joined at an address, or started on this machine."""

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shardprop.service.cluster.auth import TOKEN_VARIABLE, check_token
from shardprop.service.cluster.waits import wait_for
from shardprop.service.config import ClusterConfig
from shardprop.service.errors import ConfigError
from shardprop.service.shipped_code import stage

log = logging.getLogger(__name__)
JOIN_RETRY_SECONDS = 60.0  # a new head's Ray Client server may need this long to come up
JOIN_RETRY_PAUSE = 2.0
STAY_SECONDS = 1.0  # how often the thread that started Ray checks whether it is shut down


def code_to_ship(cluster: ClusterConfig) -> tuple[str, ...]:
    """The parts of this version of shardprop that the nodes get through runtime_env, if any.

    Workers import only `shardprop.workers` (the math) and its numpy/pyarrow/threadpoolctl;
    shipped modules come first on the workers' sys.path, so a node with another shardprop
    installed still runs the coordinator's version.
    """
    ship = cluster.ship_code
    if ship == "never" or (ship == "auto" and cluster.address is None):
        return ()
    return ("workers",)


def connect_ray(address: str | None, cpus_needed: int, ship: tuple[str, ...] = ()) -> bool:
    """Join the cluster at `address`, or start Ray on this machine when there is none.

    A local start declares at least as many CPUs as the workers ask for, so `--workers 3`
    runs on a 2-core laptop (oversubscribed) instead of waiting forever for a free CPU.
    Returns whether this call started (or joined) the runtime, and so should shut it down.
    """
    import ray

    if ray.is_initialized():
        return False
    # Ray's start-up notices (a local runtime's token, file limits...) are not the run's concern
    options: dict[str, Any] = {"logging_level": logging.ERROR, "include_dashboard": False}
    if address is None:
        # accepted: processes a run does not use (upstream fix: ray.init(minimal local node))
        # accepted: workers niced to 15 (upstream fix: a ray.init option for worker niceness)
        options["num_cpus"] = max(os.cpu_count() or 1, cpus_needed)
    else:
        options["address"] = address
        check_token(address)
    try:
        with tempfile.TemporaryDirectory(prefix="shardprop-code-") as folder:
            if ship:  # uploaded by ray.init, so the copy may go once it returns
                options["runtime_env"] = {"py_modules": [str(stage(Path(folder), ship))]}
            join_or_start(address, options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        if address is None:
            raise
        raise ConfigError(unreachable_cluster(address, error)) from None
    finally:
        logging.getLogger("ray").setLevel(logging.WARNING)  # its warnings while the run trains
    return True


def join_or_start(address: str | None, options: dict[str, Any]) -> None:
    """start_ray; a cluster that answers but cannot open a session yet (a Ray Client server
    still starting on a new head) is tried again, for JOIN_RETRY_SECONDS at most."""
    deadline = time.monotonic() + JOIN_RETRY_SECONDS
    while True:
        try:
            start_ray(options)
            return
        except ConnectionAbortedError as error:
            left = deadline - time.monotonic()
            if address is None or left <= 0:
                raise
            reason = " ".join(str(error).split())[:200]
            log.warning(
                "the Ray cluster at %s is not ready yet (%s); trying again for up to %.0f s",
                address,
                reason,
                left,
            )
            time.sleep(JOIN_RETRY_PAUSE)


def start_ray(options: dict[str, Any]) -> None:
    """ray.init, run in a thread of its own; a signal, or a failed start, ends with nothing of
    Ray left running.

    From the main thread, ray.init sets a SIGTERM handler that exits 15 past the caller's own;
    and a caller's handler that raises inside ray.init is swallowed by its `except Exception`
    blocks, or leaves a half-started node that ray.shutdown cannot end. Off the main thread Ray
    sets no handler, and the caller's handlers run in the caller's thread, which only waits.
    """
    import ray

    failed: list[BaseException] = []
    done = threading.Event()

    def start_and_stay() -> None:
        try:
            ray.init(**options)
        except BaseException as error:  # raised again in the caller's thread
            failed.append(error)
        done.set()
        # Ray's processes die with the thread that started them (Linux's parent-death signal
        # follows the thread), so it stays until Ray is shut down
        # (upstream fix: a ray.init that does not tie its processes to the calling thread)
        while not failed and ray.is_initialized():
            time.sleep(STAY_SECONDS)

    threading.Thread(target=start_and_stay, name="ray.init", daemon=True).start()
    try:
        wait_for(done)
    except BaseException:
        wait_for(done)  # a second signal ends this wait too: Ray ends with this process then
        ray.shutdown()
        raise
    if failed:
        ray.shutdown()  # what a failed start had begun
        raise failed[0]


def unreachable_cluster(address: str, error: Exception) -> str:
    """One line for a cluster this client cannot join."""
    text = " ".join(str(error).split())
    return (
        f"cluster.address: cannot join the Ray cluster at {address}: {text[:300]} "
        f"(is it up, and does it need a token? {TOKEN_VARIABLE} sets one)"
    )
