"""`shardprop submit`: run `shardprop train` on a cluster as a Ray Job, and follow it.

The Jobs API (the head's dashboard port) is the one door a cluster needs to open to its
users: the config travels in the job's command and this version of the code as its
py_modules, so the head runs exactly what was submitted, even with another (or no)
shardprop installed. Only the job's driver talks to MLflow.
"""

import asyncio
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ray.exceptions import AuthenticationError, RayError
from ray.job_submission import JobSubmissionClient

from shardprop.service.cluster.auth import TOKEN_PATH_VARIABLE, TOKEN_VARIABLE
from shardprop.service.config import Config
from shardprop.service.errors import ConfigError
from shardprop.service.shipped_code import stage

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# what Ray's job SDK raises for one thing, "the cluster did not take it": unreachable,
# refused (ray.exceptions.AuthenticationError is a RayError), or a runtime_env it rejects
SUBMIT_ERRORS = (ConnectionError, RuntimeError, ValueError, RayError)
AGENT_WAIT_SECONDS = 60


def entrypoint(config: Config) -> str:
    """The job's command: the resolved config as one `--set section={...}` per section, on
    the cluster it runs in, with the code the job itself ships.

    The config travels in the command, not as a working_dir file: Ray re-extracts a job's
    working_dir when its actors start, which pulls the driver's current directory away
    from under it. In the command, it is also in plain sight in the Ray dashboard.
    """
    command = ["python", "-m", "shardprop.service", "train", os.devnull, "--address", "auto"]
    resolved = config.resolved()
    resolved["cluster"]["ship_code"] = "never"  # shipped once, by the job
    for section, values in resolved.items():
        flow = yaml.safe_dump(values, default_flow_style=True, width=1 << 20).strip()
        command += ["--set", f"{section}={flow}"]
    return shlex.join(command)


def job_runtime_env(ship_code: str, folder: Path) -> dict[str, Any]:
    """The runtime_env that ships this version of shardprop (staged in `folder`) to the job."""
    if ship_code == "never":
        return {}
    return {"py_modules": [str(stage(folder, ("service", "workers")))]}


def job_client(address: str) -> JobSubmissionClient:

    try:
        return JobSubmissionClient(address)
    except SUBMIT_ERRORS as error:
        raise ConfigError(refused(address, error)) from None


def refused(address: str, error: Exception) -> str:
    if isinstance(error, AuthenticationError):
        return (
            f"--address: the Ray Jobs API at {address} refused this client: it requires token "
            f"authentication; set {TOKEN_VARIABLE} (or {TOKEN_PATH_VARIABLE}) to the "
            "cluster's token"
        )
    text = " ".join(str(error).split())
    return f"--address: cannot reach the Ray Jobs API at {address}: {text[:300]}"


def submit(
    config: Config,
    address: str,
    wait: bool = True,
    say: Callable[[str], None] = print,
) -> int:
    """Submit the training job; with `wait`, stream its logs and return 0 if it succeeded."""
    client = job_client(address)
    with tempfile.TemporaryDirectory(prefix="shardprop-code-") as folder:  # uploaded here
        job_id = submit_job(
            client,
            address,
            entrypoint=entrypoint(config),
            runtime_env=job_runtime_env(config.cluster.ship_code, Path(folder)),
            metadata={"shardprop.experiment": config.tracking.experiment},
        )
    say(f"submitted job {job_id} to {address}")
    if not wait:
        say(f"follow it with: ray job logs --follow {job_id} --address {address}")
        return 0
    try:
        asyncio.run(stream_logs(client, job_id))
    except KeyboardInterrupt:
        say(f"detached; the job goes on (stop it: ray job stop {job_id} --address {address})")
        return 130
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL:  # the log stream can end a moment before the status does
        time.sleep(0.2)
        status = str(client.get_job_status(job_id).value)
    say(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def submit_job(client: JobSubmissionClient, address: str, **job: Any) -> str:
    """Submit, waiting out a head whose job agent is still starting (Ray answers 500 "No
    available agent to submit job, please try again later" for its first seconds)."""
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return client.submit_job(**job)
        except SUBMIT_ERRORS as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise ConfigError(refused(address, error)) from None
        time.sleep(1)


async def stream_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()
