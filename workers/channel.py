"""A worker's end of the direct step road: the coordinator's parameters in, the step's sums
out, over one TCP connection per worker, served by a thread beside the actor's own.

Why by hand: Ray's compiled graph moves the same bytes through shared-memory channels for
about 0.55 ms a step on 2 cores (the coordinator's read of two ready results alone takes
0.2-0.4 ms); a socket per worker takes about 0.15 ms (default config, 500 steps). No
library does a two-message request/reply between Ray actors faster; the collective libraries
that would (gloo, MPI) reduce among the workers and do not hand the coordinator its
rank-ordered sums. Ray still places, watches and replaces the workers.

The stream: `REQUEST` then the parameters' bytes; `REPLY`, the sizes of the result's
arrays, a pickle of the method's result (or of the error it raised: `ok` false), then the
arrays' bytes, sent and read without a copy of their own (pickle protocol 5).
"""

import contextlib
import os
import pickle
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from shardprop.workers.errors import UserError

HANDSHAKE = struct.Struct("<16sI")  # the coordinator's token, the worker's rank
REQUEST = struct.Struct("<16s8sQ")  # method name, parameter dtype, parameter bytes
REPLY = struct.Struct("<?QI")  # ok, pickle bytes, out-of-band buffers (then their sizes)
CONNECT_SECONDS = 10.0
# after a reply, the worker polls for the next request this long before it blocks: waking
# a blocked process on these VMs takes 0.1-1 ms, the coordinator's turn takes ~0.1 ms
# (default config: 0.16 ms a step polling, 0.21-0.26 ms blocking, medians over 500 steps)
SPIN_SECONDS = 2e-3
DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # 0 where there is none: no polling


class WorkerError(Exception):
    """A worker's method raised something other than a user error; its traceback as text,
    since the exception itself may not travel."""


class StepServer:
    """Serve `method(theta)` calls from the coordinator at `address` until it hangs up."""

    def __init__(self, worker: object, address: tuple[str, int], token: bytes, rank: int):
        self._worker = worker
        self._sock = socket.create_connection(address, timeout=CONNECT_SECONDS)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(HANDSHAKE.pack(token, rank))
        self._thread = threading.Thread(target=self._serve, name="shardprop-steps", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Hang up and wait for the call in progress, if any: the actor's next call may use
        the same buffers."""
        with contextlib.suppress(OSError):  # hung up or reset: the road ends
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        self._sock.close()

    def _serve(self) -> None:
        received = bytearray()
        spin_until = 0.0
        with contextlib.suppress(OSError):  # hung up or reset: the road ends
            while receive_into(self._sock, header := bytearray(REQUEST.size), spin_until):
                name, dtype, size = REQUEST.unpack(header)
                if len(received) != size:
                    received = bytearray(size)
                if not receive_into(self._sock, received):
                    return
                theta = np.frombuffer(received, dtype=dtype.rstrip(b"\0").decode())
                method = getattr(self._worker, name.rstrip(b"\0").decode())
                send_parts(self._sock, reply_to(method, theta))
                spin_until = time.perf_counter() + SPIN_SECONDS


def send_request(sock: socket.socket, method: str, theta: np.ndarray) -> None:
    """The header and the parameters in one `sendmsg`, the parameters sent from where they
    lie."""
    header = REQUEST.pack(method.encode(), theta.dtype.str.encode(), theta.nbytes)
    send_parts(sock, [header, theta.data])


def reply_to(method: Callable[[np.ndarray], Any], theta: np.ndarray) -> list[Any]:
    """The reply's parts: its arrays out of band, sent from where they are (pickle 5)."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        ok, body = True, pickle.dumps(method(theta), protocol=5, buffer_callback=buffers.append)
    except Exception as error:
        ok, body, buffers = False, pickle.dumps(travelling(error)), []
    raws = [buffer.raw() for buffer in buffers]
    sizes = struct.pack(f"<{len(raws)}Q", *(raw.nbytes for raw in raws))
    return [REPLY.pack(ok, len(body), len(raws)) + sizes, body, *raws]


def read_reply(sock: socket.socket) -> tuple[bool, Any]:
    """(ok, the method's result or the error it raised); EOFError when the worker hung up."""
    ok, size, count = REPLY.unpack(received(sock, REPLY.size))
    sizes = struct.unpack(f"<{count}Q", received(sock, 8 * count))
    body = received(sock, size)
    return ok, pickle.loads(body, buffers=[received(sock, n) for n in sizes])


def received(sock: socket.socket, size: int) -> bytearray:
    if not receive_into(sock, buffer := bytearray(size)):
        raise EOFError("the other end hung up")
    return buffer


def send_parts(sock: socket.socket, parts: list[Any]) -> None:
    """`sendall` for several buffers, without joining them first."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        if views:
            views[0] = views[0][sent:]


def travelling(error: Exception) -> Exception:
    """A user error (bad data...) as itself, to be told in one line; anything else as its
    traceback, as Ray shows a task's."""
    if isinstance(error, UserError):
        with contextlib.suppress(Exception):
            return pickle.loads(pickle.dumps(error))
    return WorkerError("".join(traceback.format_exception(error)))


def receive_into(sock: socket.socket, buffer: bytearray, spin_until: float = 0.0) -> bool:
    """Fill `buffer` from the stream, polling until `spin_until` (perf_counter) and then
    blocking; False when the other end hung up."""
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        if DONTWAIT and time.perf_counter() < spin_until:
            try:
                n = sock.recv_into(view[got:], 0, DONTWAIT)
            except BlockingIOError:
                os.sched_yield()  # a core shared with another process lends it the time
                continue
        else:
            n = sock.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True
