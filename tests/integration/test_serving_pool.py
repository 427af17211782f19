"""Serving many connections on 127.0.0.1, in this process: the connection cap and its typed
refusal, a prompt stop with many idle connections, fairness among a few
busy ones, and a serving pool that keeps serving while some of its threads wait (held pulls, a
peer stalled mid-frame)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.config import SERVER_DESIGNS, ConsistencyConfig
from distbelief.errors import ShardUnavailableError, TooManyConnectionsError
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.sharding import TensorSpec
from distbelief.wire import Message, OpRegistry, connect, ops, serve
from distbelief.wire.message import HEADER, MAGIC, PROTOCOL_VERSION

_WAIT_S = 10.0


class _Connection:
    def close(self) -> None:
        pass


class EchoService:
    """Answers HELLO and PUSH with what was sent."""

    def __init__(self) -> None:
        self.handlers = OpRegistry()
        for op in (ops.HELLO, ops.PUSH):
            self.handlers.register(op, lambda _, request: request.reply({}, request.tensors))

    def open_connection(self, peer: str) -> _Connection:
        return _Connection()


def _wait_until(condition, timeout_s: float = _WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture(params=SERVER_DESIGNS)
def design(request) -> str:
    return request.param


def test_a_cap_of_one_connection_is_said_in_the_singular():
    server = serve("tcp://127.0.0.1:0", EchoService(), max_connections=1)
    clients = [connect(server.address, name="shard 0") for _ in range(2)]
    try:
        clients[0].request(Message(ops.HELLO), timeout_s=5)
        with pytest.raises(TooManyConnectionsError, match=r"serves 1 connection, its limit"):
            clients[1].request(Message(ops.HELLO), timeout_s=5)
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_a_connection_over_the_cap_is_refused_with_a_typed_one_line_error(design):
    server = serve("tcp://127.0.0.1:0", EchoService(), design=design, max_connections=2)
    clients = [connect(server.address, name="shard 0") for _ in range(3)]
    try:
        for client in clients[:2]:
            client.request(Message(ops.HELLO), timeout_s=5)
        with pytest.raises(TooManyConnectionsError) as refused:
            clients[2].request(Message(ops.HELLO), timeout_s=5)
        message = str(refused.value)
        assert message.startswith("shard 0: hello refused: ")
        assert "2 connections" in message and "--max-connections 2" in message
        assert "\n" not in message
        # A worker's client does not retry a refusal: it reaches the caller at once.
        started = time.monotonic()
        specs = [TensorSpec("w", (4,), torch.float32)]
        worker = ParameterServerClient([server.address], specs, retry_timeout_s=30)
        with pytest.raises(TooManyConnectionsError):
            worker.handshake(None)
        assert time.monotonic() - started < 5
        worker.close()
        clients[0].close()  # a place frees up: the refused client gets in on its next request
        _wait_until(lambda: server.num_connections == 1)
        assert clients[2].request(Message(ops.HELLO), timeout_s=5).meta == {}
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_stop_with_many_idle_connections_is_prompt(design):
    server = serve("tcp://127.0.0.1:0", EchoService(), design=design, frame_timeout_s=60)
    clients = [connect(server.address, name="echo") for _ in range(300)]
    try:
        for client in clients:
            client.request(Message(ops.HELLO), timeout_s=10)
        assert server.num_connections == 300
        started = time.monotonic()
        server.stop(timeout_s=10)
        assert time.monotonic() - started < 5  # not the 60 s an idle connection may wait
        assert server.num_connections == 0
        with pytest.raises(ShardUnavailableError):
            clients[0].request(Message(ops.HELLO), timeout_s=30)
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_a_few_busy_connections_are_served_fairly():
    server = serve("tcp://127.0.0.1:0", EchoService(), design="pool", serving_threads=2)
    payload = [("x", torch.ones(10_000))]
    counts = [0] * 4
    all_in = threading.Barrier(5, timeout=_WAIT_S)
    stop = threading.Event()

    def hammer(index: int) -> None:
        client = connect(server.address, name="echo")
        try:
            # Counting starts once every client is connected and served: a thread that a busy
            # machine starts late must not read as one the server starved.
            client.request(Message(ops.PUSH, {}, payload), timeout_s=_WAIT_S)
            all_in.wait()
            while not stop.is_set():
                client.request(Message(ops.PUSH, {}, payload), timeout_s=_WAIT_S)
                counts[index] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    all_in.wait()
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join(_WAIT_S)
    server.stop()
    # The four clients are threads of this one process: on a busy machine the GIL and the OS
    # share them out unevenly too (measured 2.4 beside a load average of 20), so this bounds
    # starvation; the benchmark measures the server's own fairness with clients in other
    # processes (max/min 1.02 at 64 replicas, 1.43 at 2,000).
    assert min(counts) > 0 and max(counts) / min(counts) <= 4, counts


def test_held_pulls_do_not_hold_back_the_other_connections():
    """Sync rounds of 3 workers on a pool of one serving thread, which is not replaced for
    being slow: each worker's pull waits for the others' pushes, which must still be served (a
    round would otherwise take half the request timeout, when the held pull gives up)."""
    shard = ParameterShard(
        0,
        1,
        server_optimizer_factory("sgd", lr=0.1),
        ConsistencyConfig(sync=True),
        num_workers=3,
    )
    service = ShardService(shard)
    server = serve("tcp://127.0.0.1:0", service, design="pool", serving_threads=1, stall_s=600)
    specs = [TensorSpec("w", (4,), torch.float32)]
    clients = [
        ParameterServerClient([server.address], specs, worker_id=f"w{i}", timeout_s=120)
        for i in range(3)
    ]
    clients[0].handshake({torch.float32: torch.zeros(4)})
    errors: list[BaseException] = []

    def work(client: ParameterServerClient) -> None:
        try:
            if client is not clients[0]:
                client.handshake(None)
            flat = {torch.float32: torch.zeros(4)}
            for clock in range(3):
                base = list(client.versions)
                client.push_now({torch.float32: torch.ones(4)}, clock=clock, base_versions=base)
                client.pull_now(flat, clock=clock + 1, after_versions=base)
        except BaseException as e:  # reported to the test thread
            errors.append(e)

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed_s = time.monotonic() - started
    for client in clients:
        client.close()
    server.stop()
    assert not errors
    assert shard.version == 3
    assert elapsed_s < 30  # one held pull at a time would take 60 s per round


def test_a_peer_stalled_mid_frame_does_not_stall_the_others():
    server = serve("tcp://127.0.0.1:0", EchoService(), design="pool", serving_threads=1)
    host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
    stalled = socket.create_connection((host, int(port)), timeout=5)
    client = connect(server.address, name="echo")
    try:
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(ops.HELLO), 0, 1, 10, 0)
        stalled.sendall(header[:7])  # and nothing more: the serving thread waits for the rest
        time.sleep(0.2)
        started = time.monotonic()
        assert client.request(Message(ops.HELLO), timeout_s=20).meta == {}
        assert time.monotonic() - started < 10  # not the 60 s frame timeout
    finally:
        stalled.close()
        client.close()
        server.stop()


def test_connections_switched_to_shared_memory_are_served_beside_pooled_ones():
    """A same-host peer that asks for shared memory leaves the pool's poller (no poller sees
    a ring fill) for a thread of its own; TCP peers stay on the pool's one thread."""
    server = serve(
        "tcp://127.0.0.1:0", EchoService(), design="pool", serving_threads=1, stall_s=600
    )
    ring = connect(server.address, name="echo", transport="shm")
    plain = [connect(server.address, name="echo", transport="tcp") for _ in range(2)]
    payload = [("x", torch.arange(100_000, dtype=torch.float32))]
    try:
        for _ in range(5):
            for client in [ring, *plain]:
                reply = client.request(Message(ops.PUSH, {}, payload), timeout_s=10)
                torch.testing.assert_close(reply.tensors[0][1], payload[0][1])
        assert server.num_connections == 3
    finally:
        for client in [ring, *plain]:
            client.close()
        server.stop()
