"""The Ray runtime a run uses: joined at an address, or started on this machine."""

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from shardprop.service.cluster.auth import TOKEN_VARIABLE, check_token
from shardprop.service.config import ClusterConfig
from shardprop.service.errors import ConfigError
from shardprop.service.shipped_code import stage


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
    options: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
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
            ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        if address is None:
            raise
        raise ConfigError(unreachable_cluster(address, error)) from None
    return True


def unreachable_cluster(address: str, error: Exception) -> str:
    """One line for a cluster this client cannot join."""
    text = " ".join(str(error).split())
    return (
        f"cluster.address: cannot join the Ray cluster at {address}: {text[:300]} "
        f"(is it up, and does it need a token? {TOKEN_VARIABLE} sets one)"
    )
