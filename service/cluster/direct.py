"""The training step over direct connections: the coordinator's end of `workers.channel`.

The same actors and the same method as the plain road; only the step's bytes take a TCP
connection per worker instead of Ray's object store or a compiled graph's channels (why by
hand: `workers.channel`). Like the compiled graph, it is only a faster road: a failure on it
is handed back to the caller, who recovers the worker the ordinary way and connects again.
"""

import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shardprop.service.cluster.compiled import BrokenStepError
from shardprop.workers.channel import (
    CONNECT_SECONDS,
    HANDSHAKE,
    read_reply,
    receive_into,
    send_request,
)

log = logging.getLogger(__name__)


class DirectStep:
    """`method(theta)` on every actor, results in rank order, one connection per actor."""

    def __init__(self, ray: Any, actors: list[Any], method: str):
        self._ray = ray
        self._actors = list(actors)
        self.method = method
        token = secrets.token_bytes(HANDSHAKE.size - 4)
        with socket.create_server((ray.util.get_node_ip_address(), 0)) as listener:
            listener.settimeout(CONNECT_SECONDS)
            address = reachable_address(listener)
            # each actor has connected when its call returns; accepted in any order after
            ray.get([actor.serve_steps.remote(address, token) for actor in self._actors])
            self._connections = accept_ranks(listener, token, len(self._actors))
        for connection in self._connections:
            connection.settimeout(None)  # a step with a timeout sets its own
        self._in_flight = False  # a step sent whose replies were not all read

    def __call__(
        self,
        theta: np.ndarray,
        timeout: float | None,
        expected: float = 0.0,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Results in rank order. `expected` is not needed here: reading a worker's reply
        blocks in the kernel, which does not spin a core the workers compute on."""
        started = time.monotonic()
        theta = np.ascontiguousarray(theta)
        self._in_flight = True
        try:
            for connection in self._connections:
                if timeout is not None:
                    connection.settimeout(timeout)
                send_request(connection, self.method, theta)
        except OSError as error:
            raise BrokenStepError(f"a worker's connection failed: {error}") from None
        if meanwhile is not None:
            meanwhile()
        replies = [
            self._reply(rank, None if timeout is None else started + timeout)
            for rank in range(len(self._connections))
        ]
        self._in_flight = False  # every reply read: the next step starts on a clean stream
        for ok, value in replies:
            if not ok:
                raise value from None  # a user error (bad data...) as itself, else a WorkerError
        return [value for _, value in replies]

    def _reply(self, rank: int, deadline: float | None) -> tuple[bool, Any]:
        connection = self._connections[rank]
        if deadline is not None:
            connection.settimeout(max(deadline - time.monotonic(), 1e-3))
        try:
            return read_reply(connection)
        except TimeoutError:
            raise BrokenStepError("no answer in time", silent=rank) from None
        except EOFError:
            raise BrokenStepError(f"worker {rank} hung up") from None  # its process died
        except OSError as error:
            raise BrokenStepError(f"worker {rank}'s connection failed: {error}") from None

    def close(self) -> None:
        """Hang up. After a step that broke off, also wait until every live worker has
        finished the call it was on: the plain road may call the same method on the same
        buffers next. (Between steps the workers' threads only wait to read, and end at the
        hang-up; an actor busy with a plain call, even a hung one, is not waited for.)"""
        for connection in self._connections:
            connection.close()
        if not self._in_flight:
            return
        stops = [actor.stop_serving.remote() for actor in self._actors]
        for stop in stops:
            try:
                self._ray.get(stop)
            except self._ray.exceptions.RayError as error:  # a dead worker has nothing to stop
                log.debug("stop_serving: %s", type(error).__name__)


def reachable_address(listener: socket.socket) -> tuple[str, int]:
    """Where the workers connect: the coordinator's node address, as Ray knows it."""
    host, port = listener.getsockname()[:2]
    return host, port


def accept_ranks(listener: socket.socket, token: bytes, size: int) -> list[socket.socket]:
    """One connection per rank, in rank order; any other connection is refused."""
    connections: dict[int, socket.socket] = {}
    try:
        while len(connections) < size:
            connection, _ = listener.accept()  # at most CONNECT_SECONDS: socket.timeout
            connection.settimeout(CONNECT_SECONDS)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = bytearray(HANDSHAKE.size)
            if receive_into(connection, hello):
                their_token, rank = HANDSHAKE.unpack(hello)
                known = secrets.compare_digest(their_token, token) and rank < size
                if known and rank not in connections:
                    connections[rank] = connection
                    continue
            connection.close()
    except BaseException:
        for connection in connections.values():
            connection.close()
        raise
    return [connections[rank] for rank in range(size)]


def open_direct_step(ray: Any, actors: list[Any], method: str) -> DirectStep | None:
    """A direct step, or None where the workers cannot connect (a firewall). Not tried
    through Ray Client, whose driver sits behind the client's tunnel."""
    if ray.util.client.ray.is_connected():
        return None
    try:
        return DirectStep(ray, actors, method)
    except Exception as error:  # Ray's errors and the sockets': the compiled road still works
        log.warning("no direct connection to the workers, using Ray's channels: %s", error)
        return None
