"""The request/reply layer on every registered channel (TCP on 127.0.0.1, shared memory): round
trips, typed errors within their timeouts, reconnects, and ops a test service defines and serves
itself (the ``scheme`` fixture: tests/conftest.py)."""

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from distbelief.errors import (
    ModelMismatchError,
    NotAPeerError,
    ProtocolError,
    PSError,
    RemoteError,
    ShardTimeoutError,
    ShardUnavailableError,
    UnknownOpError,
)
from distbelief.wire import WIRE_DTYPES, Message, OpRegistry, connect, define_op, ops, serve
from distbelief.wire.channels import Channel, Listener, channel_schemes, dial, listen, local_address
from distbelief.wire.channels.shm import ShmChannel
from distbelief.wire.channels.tcp import TcpChannel
from distbelief.wire.framing import send_message
from distbelief.wire.message import FLAG_ERROR, FLAG_REPLY, HEADER, MAGIC, PROTOCOL_VERSION
from distbelief.wire.ops import MAX_OP_CODE, op_for_code
from distbelief.wire.reader import FrameReader, recv_message
from distbelief.wire.security import WireSecurity
from tests.conftest import run_forked

ADD_ONE = define_op("TEST_TRANSPORT_ADD_ONE", 250)
"""An op only this file defines: wire/ and the shard service know nothing of it."""


class EchoConnection:
    def close(self) -> None:
        pass


def _echo(connection: EchoConnection, request: Message) -> Message:
    if request.meta.get("fail"):
        raise ValueError("asked to fail")
    if request.meta.get("mismatch"):
        raise ModelMismatchError("asked for a mismatch")
    if request.meta.get("bug"):
        raise RuntimeError("a handler bug")
    return request.reply({"seen": len(request.tensors)}, request.tensors)


class EchoService:
    """Echoes HELLO, PUSH and PULL requests, tensors included; answers no other op."""

    def __init__(self) -> None:
        self.handlers = OpRegistry()
        for op in (ops.HELLO, ops.PUSH, ops.PULL):
            self.handlers.register(op, _echo)
        self.num_connections = 0

    def open_connection(self, peer: str) -> EchoConnection:
        self.num_connections += 1
        return EchoConnection()


class CounterConnection:
    """Per-connection state of the ADD_ONE service: a buffer requests are received into."""

    def __init__(self) -> None:
        self.buffer = torch.zeros(4)
        self.num_requests = 0

    def close(self) -> None:
        pass


def _add_one_sink(connection: CounterConnection, request: Message):
    return lambda name, dtype, shape: connection.buffer


def _add_one(connection: CounterConnection, request: Message) -> Message:
    assert request.tensors[0][1] is connection.buffer  # received in place, not allocated
    connection.num_requests += 1
    connection.buffer += 1
    return request.reply({"num_requests": connection.num_requests}, request.tensors)


class CounterService:
    def __init__(self) -> None:
        self.handlers = OpRegistry()
        self.handlers.register(ADD_ONE, _add_one, sink_for=_add_one_sink)

    def open_connection(self, peer: str) -> CounterConnection:
        return CounterConnection()


@pytest.fixture
def echo_service() -> EchoService:
    return EchoService()


@pytest.fixture
def echo_server(scheme, echo_service):
    server = serve(local_address(scheme), echo_service)
    yield server
    server.stop()


def test_every_channel_kind_is_tested():
    assert channel_schemes() == ["shm", "tcp"]


def test_the_channel_is_the_kind_asked_for(echo_server, scheme):
    channel = dial(echo_server.address, timeout_s=5)
    try:
        assert type(channel) is {"tcp": TcpChannel, "shm": ShmChannel}[scheme]
    finally:
        channel.close()


def test_round_trip_every_dtype(echo_server):
    client = connect(echo_server.address, name="echo")
    tensors = [(str(dtype), torch.ones(1000, dtype=dtype)) for dtype in WIRE_DTYPES]
    reply = client.request(Message(ops.PUSH, {}, tensors), timeout_s=5)
    assert reply.meta == {"seen": len(WIRE_DTYPES)}
    for (name, sent), (got_name, got) in zip(tensors, reply.tensors, strict=True):
        assert name == got_name and got.dtype == sent.dtype and torch.equal(got, sent)
    client.close()


def test_large_tensor_into_reused_buffer(echo_server):
    client = connect(echo_server.address, name="echo")
    target = torch.empty(3_000_000)
    payload = torch.randn(3_000_000)
    for _ in range(2):
        reply = client.request(
            Message(ops.PULL, {}, [("w", payload)]), timeout_s=10, sink=lambda *a: target
        )
        assert reply.tensors[0][1] is target
    assert torch.equal(target, payload)
    client.close()


def test_remote_error_keeps_connection_usable(echo_server, echo_service):
    client = connect(echo_server.address, name="echo")
    with pytest.raises(RemoteError, match="asked to fail"):
        client.request(Message(ops.HELLO, {"fail": True}), timeout_s=5)
    assert client.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
    assert echo_service.num_connections == 1
    client.close()


def test_error_kinds_arrive_as_their_exception_types(echo_server):
    client = connect(echo_server.address, name="echo")
    with pytest.raises(ModelMismatchError, match="asked for a mismatch"):
        client.request(Message(ops.HELLO, {"mismatch": True}), timeout_s=5)
    with pytest.raises(RemoteError, match="a handler bug") as raised:
        client.request(Message(ops.HELLO, {"bug": True}), timeout_s=5)
    assert type(raised.value) is RemoteError
    client.close()


def test_unknown_op_is_answered_and_connection_stays_usable(echo_server, echo_service):
    client = connect(echo_server.address, name="echo")
    with pytest.raises(UnknownOpError, match=r"stats refused: unknown op STATS \(this server"):
        client.request(Message(ops.STATS, {}, [("w", torch.ones(50_000))]), timeout_s=5)
    assert client.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
    assert echo_service.num_connections == 1
    client.close()


def test_op_code_undefined_at_the_server_is_answered(echo_server, echo_service):
    # Raw frames: this process defines the same ops as the server, so a client here could not
    # send (or read the reply to) an op only it knows, as a peer with an extra capability can.
    code = next(c for c in range(MAX_OP_CODE, 0, -1) if op_for_code(c) is None)
    channel = dial(echo_server.address, timeout_s=5)
    channel.settimeout(5)
    reader = FrameReader(channel)
    try:
        meta = b'{"tensors":[["w","float32",[50000]]]}'
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, code, 0, 7, len(meta), 200_000)
        channel.sendall(header + meta + bytes(200_000))
        _, _, reply_code, flags, request_id, meta_len, payload_len = HEADER.unpack(
            reader.read_bytes(HEADER.size, None)
        )
        assert (reply_code, flags, request_id, payload_len) == (code, FLAG_REPLY | FLAG_ERROR, 7, 0)
        assert json.loads(reader.read_bytes(meta_len, None)) == {
            "error": "unknown_op",
            "message": f"unknown op code {code}",
        }
        send_message(channel, Message(ops.HELLO, request_id=8))
        reply = recv_message(reader)
        assert (reply.request_id, reply.meta, reply.is_error) == (8, {"seen": 0}, False)
    finally:
        channel.close()
    assert echo_service.num_connections == 1


def test_op_defined_outside_wire_is_served_with_per_connection_state(scheme):
    server = serve(local_address(scheme), CounterService())
    clients = [connect(server.address, name=f"counter {i}") for i in range(2)]
    try:
        for expected in (1, 2):
            reply = clients[0].request(Message(ADD_ONE, {}, [("x", torch.ones(4))]), timeout_s=5)
            assert reply.meta == {"num_requests": expected}
            assert torch.equal(reply.tensors[0][1], torch.full((4,), 2.0))
        reply = clients[1].request(Message(ADD_ONE, {}, [("x", torch.zeros(4))]), timeout_s=5)
        assert reply.meta == {"num_requests": 1}
        with pytest.raises(RemoteError, match="unknown op HELLO"):
            clients[1].request(Message(ops.HELLO), timeout_s=5)
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_missing_shard_is_unavailable_quickly(scheme):
    listener = listen(local_address(scheme))
    address = listener.address
    listener.close()  # nothing listens there any more
    client = connect(address, name="shard 0")
    started = time.monotonic()
    with pytest.raises(ShardUnavailableError, match="shard 0: hello"):
        client.request(Message(ops.HELLO), timeout_s=30)
    assert time.monotonic() - started < 5  # refused at once; the bound leaves room for load


class _RawPeer:
    """A server-side peer that speaks the channel but not the protocol: it accepts one
    connection and then does whatever the test tells it to."""

    def __init__(self, listener: Listener, act) -> None:
        self.channels: list[Channel] = []
        self.done = threading.Event()

        def accept() -> None:
            channel = listener.accept(5).open(5)
            self.channels.append(channel)
            act(channel)
            self.done.wait(10)
            channel.close()

        self._thread = threading.Thread(target=accept, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.done.set()
        self._thread.join(15)


@pytest.fixture
def raw_peer(scheme) -> Iterator:
    peers, listeners = [], []

    def start(act) -> str:
        listener = listen(local_address(scheme))
        listeners.append(listener)
        peers.append(_RawPeer(listener, act))
        return listener.address

    yield start
    for peer in peers:
        peer.stop()
    for listener in listeners:
        listener.close()


def test_silent_shard_times_out_within_the_timeout(raw_peer):
    address = raw_peer(lambda channel: None)  # accepts, never answers
    client = connect(address, name="shard 1")
    started = time.monotonic()
    with pytest.raises(ShardTimeoutError, match=r"shard 1: pull timed out after 0.5s"):
        client.request(Message(ops.PULL), timeout_s=0.5)
    assert time.monotonic() - started < 5  # not the default timeout; room for a busy machine
    assert issubclass(ShardTimeoutError, PSError)
    client.close()


def test_a_handshake_that_times_out_names_the_connect_timeout(scheme):
    """The channel's own handshake (here the job key's) runs under the connect timeout, not the
    request's: the error names the bound that ran out."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # never accepts: the kernel completes the connection, no one answers
        address = f"{scheme}://127.0.0.1:{silent.getsockname()[1]}"
        security = WireSecurity(auth_key=b"k" * 32)
        client = connect(address, name="shard 1", connect_timeout_s=1, security=security)
        started = time.monotonic()
        with pytest.raises(ShardTimeoutError) as info:
            client.request(Message(ops.HELLO), timeout_s=60)
        assert time.monotonic() - started < 30  # the connect timeout, not the request's
        assert str(info.value) == (
            "shard 1: hello timed out after 1s connecting: the peer took the connection but "
            "answered nothing (a shard stopped or too busy to answer, or another program that "
            "waits for a request of its own protocol: a web server, say)"
        )
        client.close()


def test_a_send_to_a_peer_that_stopped_reading_times_out(raw_peer):
    # The peer reads one byte (which lets a shared-memory channel finish its handshake), then
    # nothing: the socket buffers, or the ring, fill up and the writer must give up in time.
    address = raw_peer(lambda channel: channel.recv_into(bytearray(1)))
    channel = dial(address, timeout_s=5)
    try:
        channel.settimeout(0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            channel.sendall(bytes(64 * 1024 * 1024))
        assert time.monotonic() - started < 6  # room for a busy machine
    finally:
        channel.close()


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["no key", "key"])
def test_a_program_that_waits_in_silence_is_said_to_answer_nothing(scheme, key):
    """A web server waits for a whole request line, which a shard's first bytes never end:
    it answered nothing, and the timeout said only "timed out" (or "connecting"), as if the
    address were a shard's that had stopped."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # never accepts: the kernel completes the connection, no one answers
        address = f"{scheme}://127.0.0.1:{silent.getsockname()[1]}"
        security = WireSecurity(auth_key=key)
        client = connect(address, name="shard 2", connect_timeout_s=1, security=security)
        with pytest.raises(ShardTimeoutError) as info:
            client.request(Message(ops.HELLO), timeout_s=2)
        client.close()
    assert "the peer took the connection but answered nothing" in str(info.value)
    assert "a web server, say" in str(info.value)


def test_garbage_reply_is_a_protocol_error(raw_peer):
    address = raw_peer(lambda channel: channel.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(40)))
    client = connect(address, name="shard 2")
    with pytest.raises(ProtocolError, match="magic"):
        client.request(Message(ops.HELLO), timeout_s=30)
    client.close()


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["no key", "key"])
def test_another_program_at_the_address_is_not_a_peer(foreign_program, scheme, key):
    """Whatever the client says first (a frame, a shared-memory request, a job key), another
    program's answer is told apart from a shard's failure: NotAPeerError, at once."""
    security = WireSecurity(auth_key=key)
    client = connect(f"{scheme}://{foreign_program}", name="shard 2", security=security)
    started = time.monotonic()
    with pytest.raises(NotAPeerError, match=r"^shard 2: hello: .*not a"):
        client.request(Message(ops.HELLO), timeout_s=30)
    assert time.monotonic() - started < 20  # not retried until the timeout; room for load
    assert issubclass(NotAPeerError, ProtocolError)
    client.close()


def test_a_peer_of_another_protocol_version_says_its_version_over_either_channel(scheme):
    """Shared memory, tried unasked on this host, said ``bad magic b'DBLF': not a distbelief
    peer`` of a peer whose frames are of another version of this protocol; TCP said which."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def answer() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(30)
                connection.recv(4096)
                connection.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION + 1, 0, 0, 0, 0, 0))
                connection.recv(4096)  # until the client hangs up

    peer = threading.Thread(target=answer, daemon=True)
    peer.start()
    client = connect(f"{scheme}://127.0.0.1:{listener.getsockname()[1]}", name="shard 0")
    try:
        version = (
            f"protocol version {PROTOCOL_VERSION + 1} \\(this side speaks {PROTOCOL_VERSION}\\)"
        )
        with pytest.raises(ProtocolError, match=version):
            client.request(Message(ops.HELLO), timeout_s=30)
    finally:
        client.close()
        listener.close()
        peer.join(timeout=60)


def test_a_ps_address_of_another_program_is_a_usage_error_naming_ps(foreign_program):
    address = f"tcp://{foreign_program}"
    done = run_forked("eval", "--once", "--ps", address, "--transport", "tcp", "--timeout", "30")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"distbelief eval: error: argument --ps: shard 0 ({address}): hello: bad magic "
        "b'HTTP': not a distbelief peer: give the shards' addresses"
    ]
    # Shared memory, tried unasked on this host, says so as TCP does: it was not asked for.
    done = run_forked("eval", "--once", "--ps", address, "--timeout", "30")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"distbelief eval: error: argument --ps: shard 0 ({address}): hello: bad magic "
        "b'HTTP': not a distbelief peer: give the shards' addresses"
    )


def test_client_reconnects_after_server_restart(scheme):
    server = serve(local_address(scheme), EchoService())
    address = server.address
    client = connect(address, name="echo")
    assert client.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
    server.stop()
    with pytest.raises(ShardUnavailableError):
        client.request(Message(ops.HELLO), timeout_s=30)
    server = serve(address, EchoService())
    try:
        assert client.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
    finally:
        client.close()
        server.stop()


def test_stop_ends_idle_connections_promptly(scheme):
    server = serve(local_address(scheme), EchoService(), frame_timeout_s=60)
    client = connect(server.address, name="echo")
    assert client.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
    started = time.monotonic()
    server.stop(timeout_s=10)
    assert time.monotonic() - started < 5  # not the 60 s an idle connection may wait
    with pytest.raises(ShardUnavailableError):
        client.request(Message(ops.HELLO), timeout_s=30)
    client.close()


def test_bad_address_names_it():
    with pytest.raises(ValueError, match="'tcp://nohost'"):
        connect("tcp://nohost", name="x")
    with pytest.raises(ValueError, match="unknown scheme 'udp'"):
        connect("udp://127.0.0.1:1", name="x")
