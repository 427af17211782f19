"""The TCP backend on 127.0.0.1: round trips, typed errors within their timeouts, reconnects."""

import socket
import threading
import time

import pytest
import torch

from distbelief.errors import (
    ProtocolError,
    PSError,
    RemoteError,
    ShardTimeoutError,
    ShardUnavailableError,
)
from distbelief.wire import WIRE_DTYPES, Message, Op, connect, serve


class EchoConnection:
    def sink_for(self, request):
        return None

    def handle(self, request):
        if request.meta.get("fail"):
            raise ValueError("asked to fail")
        return request.reply({"seen": len(request.tensors)}, request.tensors)

    def close(self):
        pass


class EchoHandler:
    def open_connection(self, peer):
        return EchoConnection()


@pytest.fixture
def echo_server():
    server = serve("tcp://127.0.0.1:0", EchoHandler())
    yield server
    server.stop()


def test_round_trip_every_dtype(echo_server):
    client = connect(echo_server.address, name="echo")
    tensors = [(str(dtype), torch.ones(1000, dtype=dtype)) for dtype in WIRE_DTYPES]
    reply = client.request(Message(Op.PUSH, {}, tensors), timeout_s=5)
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
            Message(Op.PULL, {}, [("w", payload)]), timeout_s=10, sink=lambda *a: target
        )
        assert reply.tensors[0][1] is target
    assert torch.equal(target, payload)
    client.close()


def test_remote_error_keeps_connection_usable(echo_server):
    client = connect(echo_server.address, name="echo")
    with pytest.raises(RemoteError, match="asked to fail"):
        client.request(Message(Op.HELLO, {"fail": True}), timeout_s=5)
    assert client.request(Message(Op.HELLO), timeout_s=5).meta == {"seen": 0}
    client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_shard_is_unavailable_quickly():
    client = connect(f"tcp://127.0.0.1:{_free_port()}", name="shard 0")
    started = time.monotonic()
    with pytest.raises(ShardUnavailableError, match="shard 0: hello"):
        client.request(Message(Op.HELLO), timeout_s=2)
    assert time.monotonic() - started < 2


def test_silent_shard_times_out_within_the_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the TCP handshake via the backlog, never answers
        client = connect(f"tcp://127.0.0.1:{listener.getsockname()[1]}", name="shard 1")
        started = time.monotonic()
        with pytest.raises(ShardTimeoutError, match=r"shard 1: pull timed out after 0.5s"):
            client.request(Message(Op.PULL), timeout_s=0.5)
        assert time.monotonic() - started < 1.5
        assert issubclass(ShardTimeoutError, PSError)


def test_garbage_reply_is_a_protocol_error():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = connect(f"tcp://127.0.0.1:{listener.getsockname()[1]}", name="shard 2")
        client_sock = None

        def answer_garbage():
            nonlocal client_sock
            client_sock, _ = listener.accept()
            client_sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(40))

        thread = threading.Thread(target=answer_garbage)
        thread.start()
        with pytest.raises(ProtocolError, match="magic"):
            client.request(Message(Op.HELLO), timeout_s=2)
        thread.join(5)
        client_sock.close()


def test_client_reconnects_after_server_restart():
    server = serve("tcp://127.0.0.1:0", EchoHandler())
    address = server.address
    client = connect(address, name="echo")
    assert client.request(Message(Op.HELLO), timeout_s=5).meta == {"seen": 0}
    server.stop()
    with pytest.raises(ShardUnavailableError):
        client.request(Message(Op.HELLO), timeout_s=2)
    server = serve(address, EchoHandler())
    try:
        assert client.request(Message(Op.HELLO), timeout_s=5).meta == {"seen": 0}
    finally:
        client.close()
        server.stop()


def test_bad_address_names_it():
    with pytest.raises(ValueError, match="'tcp://nohost'"):
        connect("tcp://nohost", name="x")
    with pytest.raises(ValueError, match="unknown scheme 'udp'"):
        connect("udp://127.0.0.1:1", name="x")
