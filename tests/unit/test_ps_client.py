"""ParameterServerClient's request lanes and slice views, over a scripted in-process transport."""

import threading
import time

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.client.rows import RowClient
from distbelief.client.vectors import ShardVectors
from distbelief.errors import ClosedError, RemoteError, ShardUnavailableError
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire import Message, Op, ops

SPECS = tensor_specs([("w", torch.zeros(6)), ("b", torch.zeros(2))])


class ScriptedTransport:
    """Answers pushes and pulls at once, recording the order and thread of every request."""

    memory_channel = None  # a shard in this process, not on a shared-memory channel

    def __init__(self) -> None:
        self.calls: list[tuple[Op, int, str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def request(self, message, *, timeout_s, sink=None):
        assert self.gate.wait(5), "test gate never opened"
        self.calls.append(
            (message.op, message.meta.get("clock", 0), threading.current_thread().name)
        )
        if message.op == ops.PUSH:
            return message.reply({"version": len(self.calls), "staleness": 0})
        tensors = []
        for name, dtype, shape in [("float32[0:8]", torch.float32, (8,))]:
            target = sink(name, dtype, shape)
            target.fill_(float(len(self.calls)))
            tensors.append((name, target))
        return message.reply({"version": len(self.calls), "held": False}, tensors)

    def close(self) -> None:
        pass


def _client() -> tuple[ParameterServerClient, ScriptedTransport]:
    client = ParameterServerClient(
        ["tcp://127.0.0.1:9"], SPECS, timeout_s=5, retry_timeout_s=0, worker_id="w"
    )
    transport = ScriptedTransport()
    client._transports = [transport]
    return client, transport


def test_push_now_runs_on_the_calling_thread_when_idle():
    client, transport = _client()
    try:
        flats = FlatLayout(SPECS).allocate()
        assert client.push_now(flats, clock=1) == [1]
        assert client.pull_now(flats, clock=2) == [2]
        assert [name for _, _, name in transport.calls] == [threading.current_thread().name] * 2
        assert bool((flats[torch.float32] == 2.0).all())
    finally:
        client.close()


def test_push_now_behind_queued_requests_keeps_their_order():
    client, transport = _client()
    try:
        flats = FlatLayout(SPECS).allocate()
        transport.gate.clear()  # the queued push waits in the I/O thread
        queued = client.push(flats, clock=1)
        opener = threading.Timer(0.2, transport.gate.set)
        opener.start()
        assert client.push_now(flats, clock=2) == [2]
        assert client.wait(queued) == [1]
        assert [clock for _, clock, _ in transport.calls] == [1, 2]
        opener.join()
    finally:
        client.close()


def test_slice_views_follow_replaced_buffers():
    client, _ = _client()
    try:
        flats = FlatLayout(SPECS).allocate()
        client.pull_now(flats)
        old = flats[torch.float32]
        flats[torch.float32] = torch.zeros(8)  # a new buffer under the same dict
        client.pull_now(flats)
        assert bool((flats[torch.float32] == 2.0).all())
        assert bool((old == 1.0).all())
    finally:
        client.close()


def test_close_without_waiting_cancels_queued_requests():
    client, transport = _client()
    flats = FlatLayout(SPECS).allocate()
    transport.gate.clear()
    running = client.push(flats, clock=1)
    queued = client.push(flats, clock=2)
    deadline = time.monotonic() + 5
    while not running[0].running() and time.monotonic() < deadline:
        time.sleep(0.01)
    client.close(wait=False)
    assert queued[0].cancelled()
    transport.gate.set()
    assert client.wait(running) == [1]
    with pytest.raises(ClosedError, match="after close"):
        client.push(flats, clock=3)


def test_every_request_after_close_names_the_closed_client():
    client, transport = _client()
    flats = FlatLayout(SPECS).allocate()
    client.close()
    vectors = ShardVectors(client)  # Sandblaster's worker side, over the same lanes
    rows = RowClient(["tcp://127.0.0.1:9"], {"t": 4}, timeout_s=5, retry_timeout_s=0)
    rows.close()
    for call, owner in [
        (lambda: client.push(flats, clock=1), "ParameterServerClient"),
        (lambda: client.push_now(flats, clock=1), "ParameterServerClient"),
        (lambda: client.pull(flats), "ParameterServerClient"),
        (lambda: client.pull_now(flats), "ParameterServerClient"),
        (client.stats, "ParameterServerClient"),
        (lambda: vectors.read("x", flats), "ParameterServerClient"),
        (lambda: rows.pull({"t": torch.tensor([1])}), "RowClient"),
    ]:
        with pytest.raises(ClosedError, match=rf"^{owner}: a request after close\(\)$"):
            call()
    assert transport.calls == []
    client.close()  # closing twice does nothing


def test_request_each_needs_one_distinct_message_per_shard():
    client = ParameterServerClient(
        ["tcp://127.0.0.1:9", "tcp://127.0.0.1:10"], SPECS, timeout_s=5, retry_timeout_s=0
    )
    try:
        message = Message(ops.STATS)
        with pytest.raises(ValueError, match="2 shards need one distinct message"):
            client.request_each([message, message])  # a transport numbers what it sends
        with pytest.raises(ValueError, match="2 shards need one distinct message"):
            client.request_each([message])
    finally:
        client.close()


def test_unreachable_says_whether_the_last_wait_gave_up_on_a_shard():
    client, transport = _client()  # retry_timeout_s=0: a failed request gives up at once
    answer = transport.request
    failure: list[Exception] = []

    def request(message, *, timeout_s, sink=None):
        if failure:
            raise failure[0]
        return answer(message, timeout_s=timeout_s, sink=sink)

    transport.request = request
    flats = FlatLayout(SPECS).allocate()
    try:
        assert not client.unreachable
        failure.append(ShardUnavailableError("shard 0: connection refused"))
        with pytest.raises(ShardUnavailableError, match="gave up after retrying"):
            client.push_now(flats, clock=1)
        assert client.unreachable
        failure[0] = RemoteError("shard 0: refused")  # it answered: reachable again
        with pytest.raises(RemoteError):
            client.push_now(flats, clock=2)
        assert not client.unreachable
        failure[0] = ShardUnavailableError("shard 0: connection refused")
        with pytest.raises(ShardUnavailableError):
            client.wait(client.pull(flats, clock=3))
        assert client.unreachable
        failure.clear()
        assert client.push_now(flats, clock=4)
        assert not client.unreachable
    finally:
        client.close(wait=False)
