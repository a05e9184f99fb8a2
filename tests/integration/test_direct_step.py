"""The direct road: the step's parameters and sums over one TCP connection per Ray worker.
The same bits as the full batch in one process; a lost, silent or failing worker handled as
on the other roads; a coordinator the workers cannot reach leaves the compiled graph."""

import socket
import threading
import time

import numpy as np
import pytest

from shardprop.service.cluster import direct
from shardprop.service.cluster.compiled import CompiledStep
from shardprop.service.cluster.direct import DirectStep, accept_ranks
from shardprop.service.training.reduce import reduce_sums
from shardprop.workers.channel import (
    HANDSHAKE,
    StepServer,
    WorkerError,
    read_reply,
    reply_to,
    send_parts,
    send_request,
)
from shardprop.workers.errors import DataError
from shardprop.workers.reduction.sums import ShardSums
from tests.groups import prepared


def full_batch(*sets: str):
    group, theta = prepared(0, *sets)
    return reduce_sums(group.call("gradient", theta))


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_direct_steps_give_the_full_batch_gradient_bit_for_bit(ray_session, workers, dtype):
    """1001 rows: uneven shards for 2 and 3 workers; the exact reduction makes every worker
    count give the in-process bits."""
    reference = full_batch(f"model.dtype={dtype}")
    group, theta = prepared(workers, f"model.dtype={dtype}")
    try:
        for _ in range(3):  # the connections are reused from step to step
            total = reduce_sums(group.call("gradient", theta))
            assert isinstance(group._step, DirectStep)
            assert np.array_equal(total.grad, reference.grad)
            assert total.loss == reference.loss and total.rows == reference.rows
    finally:
        group.close()


@pytest.mark.cluster
@pytest.mark.slow
def test_the_direct_road_serves_the_first_step_and_starts_no_graph(ray_session):
    group, theta = prepared(2)
    try:
        assert group._driver_proxy is None  # only a compiled graph needs Ray's driver actor
        group.prepare_steps(theta)
        ready = group._step
        assert isinstance(ready, DirectStep)
        group.call("gradient", theta)
        assert group._step is ready
    finally:
        group.close()
    assert group._step is None


@pytest.mark.cluster
@pytest.mark.slow
def test_a_silent_worker_is_replaced_after_the_step_timeout(ray_session):
    group, theta = prepared(2, **{"cluster.step_timeout": 3})
    try:
        reference = reduce_sums(group.call("gradient", theta))
        silent = group.actors[1]
        ray_session.get(silent.__ray_call__.remote(lambda w: setattr(w, "gradient", w.hang)))
        started = time.monotonic()
        total = reduce_sums(group.call("gradient", theta))
        assert 3 <= time.monotonic() - started < 30
        assert np.array_equal(total.grad, reference.grad)
        assert group.restarts == 1 and group.actors[1] != silent
        group.call("gradient", theta)  # the replacement is connected anew
        assert isinstance(group._step, DirectStep)
    finally:
        group.close()


def fail_with(ray, actor, error: Exception) -> None:
    """The actor's gradient raises `error` from now on."""

    def raising(theta: np.ndarray) -> None:
        raise error

    ray.get(actor.__ray_call__.remote(lambda w: setattr(w, "gradient", raising)))


@pytest.mark.cluster
@pytest.mark.slow
def test_a_workers_own_error_comes_back_as_itself(ray_session):
    """A user error (bad data...) as one clear line; anything else with the worker's
    traceback. Neither is a lost worker, and the steps after it read their own sums."""
    group, theta = prepared(2)
    try:
        reference = reduce_sums(group.call("gradient", theta))
        worker = group.actors[0]  # the others' replies wait behind its own
        fail_with(ray_session, worker, DataError("data: column x1 has a NaN at row 7"))
        with pytest.raises(DataError, match="NaN at row 7"):
            group.call("gradient", theta)
        fail_with(ray_session, worker, ZeroDivisionError("odd"))
        with pytest.raises(WorkerError, match="ZeroDivisionError: odd"):
            group.call("gradient", theta)
        ray_session.get(worker.__ray_call__.remote(lambda w: w.__dict__.pop("gradient")))
        after = reduce_sums(group.call("gradient", theta * 0.5))
        assert not np.array_equal(after.grad, reference.grad)  # not the last step's
        assert np.array_equal(after.grad, reduce_sums(group.call("gradient", theta * 0.5)).grad)
        assert group.restarts == 0 and group.actors[0] == worker
        assert isinstance(group._step, DirectStep)
    finally:
        group.close()


@pytest.mark.cluster
@pytest.mark.slow
def test_workers_that_cannot_connect_take_the_compiled_graph(ray_session, monkeypatch):
    """As behind a firewall: the workers are told a port where nothing listens."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        nowhere = closed.getsockname()[:2]
    monkeypatch.setattr(direct, "reachable_address", lambda listener: nowhere)
    reference = full_batch()
    group, theta = prepared(2)
    try:
        group.prepare_steps(theta)
        assert isinstance(group._step, CompiledStep)
        assert np.array_equal(reduce_sums(group.call("gradient", theta)).grad, reference.grad)
    finally:
        group.close()


def test_a_connection_without_the_token_is_refused():
    token = b"t" * 16
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        address = listener.getsockname()[:2]
        stray = socket.create_connection(address)
        stray.sendall(HANDSHAKE.pack(b"x" * 16, 0))
        worker = socket.create_connection(address)
        worker.sendall(HANDSHAKE.pack(token, 0))
        (accepted,) = accept_ranks(listener, token, 1)
        accepted.sendall(b"hello")
        assert worker.recv(5) == b"hello"
        assert stray.recv(5) == b""  # hung up on
        for end in (stray, worker, accepted):
            end.close()


class SlowWorker:
    """A step that takes a while, and says when it ended."""

    def __init__(self):
        self.ended = threading.Event()

    def gradient(self, theta: np.ndarray) -> float:
        time.sleep(0.5)
        self.ended.set()
        return float(theta.sum())


def test_stopping_a_worker_waits_for_the_call_in_progress():
    """The actor's next call (the plain road's) may use the same buffers."""
    worker, token = SlowWorker(), b"t" * 16
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        server = StepServer(worker, listener.getsockname()[:2], token, 0)
        (connection,) = accept_ranks(listener, token, 1)
    theta = np.arange(4.0)
    send_request(connection, "gradient", theta)
    time.sleep(0.1)  # the call has started
    server.stop()
    assert worker.ended.is_set()
    with pytest.raises(EOFError):  # hung up: no reply
        read_reply(connection)
    connection.close()


def test_a_reply_carries_its_arrays_out_of_band():
    """The sums' gradient is sent from where it lies and read into its own buffer."""
    theta = np.linspace(-1, 1, 300_001)
    parts = reply_to(lambda t: ShardSums(2 * t, 1.5, 7, 3), theta)
    assert sum(memoryview(p).nbytes for p in parts[2:]) == theta.nbytes  # out of band
    one, other = socket.socketpair()
    with one, other:
        sender = threading.Thread(target=send_parts, args=(one, parts))
        sender.start()  # more than a socket buffer holds: read while it is sent
        ok, sums = read_reply(other)
        sender.join()
    assert ok and np.array_equal(sums.grad, 2 * theta) and sums.grad.flags.writeable
    assert (sums.loss, sums.rows, sums.correct) == (1.5, 7, 3)
