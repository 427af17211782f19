"""Frame encoding and decoding over a socketpair (no network)."""

import socket
import struct
import threading
import time

import pytest
import torch

from distbelief.errors import ProtocolError
from distbelief.wire import WIRE_DTYPES, Message, ops
from distbelief.wire.framing import RejectedFrame, send_message
from distbelief.wire.message import HEADER, MAGIC, PROTOCOL_VERSION
from distbelief.wire.ops import MAX_OP_CODE, op_for_code
from distbelief.wire.reader import BUFFER_BYTES, FrameReader, recv_message


@pytest.fixture
def pair():
    """(sending socket, reader of the other end), both with Python's own timeouts."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, FrameReader(b)
    a.close()
    b.close()


@pytest.fixture
def short_timeout_pair():
    """Like ``pair``, but the reading end gives up on any call after 0.3 s."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(0.3)
    yield a, FrameReader(b)
    a.close()
    b.close()


def send_in_background(sock, *messages) -> threading.Thread:
    """Send while the test reads: a socketpair's buffer cannot hold a large frame."""

    def send() -> None:
        for message in messages:
            send_message(sock, message)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _sample(dtype: torch.dtype, shape=(3, 4)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(0, 100, shape).to(dtype)


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
def test_round_trip_every_dtype(pair, dtype):
    tensors = [
        ("a", _sample(dtype)),
        ("empty", _sample(dtype, (0, 2))),
        ("big", _sample(dtype, (300, 300))),
    ]
    sender = send_in_background(pair[0], Message(ops.PUSH, {"k": 1}, tensors, request_id=7))
    got = recv_message(pair[1])
    sender.join(5)
    assert (got.op, got.request_id, got.meta) == (ops.PUSH, 7, {"k": 1})
    for (name, want), (got_name, tensor) in zip(tensors, got.tensors, strict=True):
        assert name == got_name and tensor.dtype == dtype and torch.equal(tensor, want)


def test_receives_into_the_sink_buffer(pair):
    target = torch.zeros(1000)
    send_in_background(pair[0], Message(ops.PULL, {}, [("w", torch.arange(1000.0))]))
    got = recv_message(pair[1], sink_for=lambda _m: lambda name, dtype, shape: target)
    assert got.tensors[0][1] is target and torch.equal(target, torch.arange(1000.0))


def test_refused_tensor_leaves_stream_in_sync(pair):
    def refuse(name, dtype, shape):
        raise ProtocolError(f"no room for {name}")

    send_in_background(
        pair[0],
        Message(ops.PUSH, {}, [("w", torch.ones(50_000))], request_id=1),
        Message(ops.HELLO, {}, [], request_id=2),
    )
    with pytest.raises(RejectedFrame, match="no room for w"):
        recv_message(pair[1], sink_for=lambda _m: refuse)
    assert recv_message(pair[1]).request_id == 2


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (HEADER.pack(b"HTTP", PROTOCOL_VERSION, 1, 0, 1, 0, 0), "magic"),
        (HEADER.pack(MAGIC, 99, 1, 0, 1, 0, 0), "version"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, 1, 0, 1, 1 << 30, 0), "metadata"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, 1, 0, 1, 0, 1 << 40), "payload"),
    ],
)
def test_bad_headers_raise_protocol_error(pair, header, match):
    pair[0].sendall(header)
    with pytest.raises(ProtocolError, match=match):
        recv_message(pair[1], max_payload_bytes=1 << 32)


def _undefined_op_code() -> int:
    return next(code for code in range(MAX_OP_CODE, 0, -1) if op_for_code(code) is None)


def test_undefined_op_code_is_refused_and_stream_stays_in_sync(pair):
    code = _undefined_op_code()
    meta = b'{"tensors":[["w","float32",[4]]]}'
    frame = HEADER.pack(MAGIC, PROTOCOL_VERSION, code, 0, 9, len(meta), 16) + meta + bytes(16)
    pair[0].sendall(frame + _encoded(Message(ops.STATS, {"next": True}, request_id=10)))
    with pytest.raises(RejectedFrame, match=f"unknown op code {code}") as refused:
        recv_message(pair[1])
    assert (int(refused.value.message.op), refused.value.message.request_id) == (code, 9)
    assert recv_message(pair[1]).meta == {"next": True}


def test_descriptors_must_match_payload(pair):
    meta = b'{"tensors":[["w","float32",[4]]]}'
    pair[0].sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, 3, 0, 1, len(meta), 8) + meta + bytes(8))
    with pytest.raises(RejectedFrame, match="16 bytes"):
        recv_message(pair[1])


@pytest.mark.parametrize("shape", [[0, 1 << 62, 1 << 62], [0, (1 << 64) - 1]])
def test_an_empty_tensor_of_a_shape_too_large_is_refused_and_stream_stays_in_sync(pair, shape):
    meta = b'{"tensors":[["w","float32",%s]]}' % str(shape).replace(" ", "").encode()
    frame = HEADER.pack(MAGIC, PROTOCOL_VERSION, 3, 0, 1, len(meta), 0) + meta
    pair[0].sendall(frame + _encoded(Message(ops.STATS, {"next": True}, request_id=2)))
    with pytest.raises(RejectedFrame, match="too large"):
        recv_message(pair[1])
    assert recv_message(pair[1]).meta == {"next": True}


def test_truncated_frame_is_a_connection_error(pair):
    pair[0].sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, 1, 0, 1, 10, 0)[:5])
    pair[0].close()
    with pytest.raises(ConnectionError):
        recv_message(pair[1])


def _encoded(message: Message) -> bytes:
    """The exact bytes send_message writes for ``message``."""
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)
        b.settimeout(5)
        size = send_message(a, message)
        data = b""
        while len(data) < size:
            data += b.recv(size - len(data))
    return data


def test_frames_written_together_are_read_one_by_one(pair):
    frames = [Message(ops.PUSH, {"n": i}, [("w", torch.full((3,), float(i)))]) for i in range(5)]
    pair[0].sendall(b"".join(_encoded(frame) for frame in frames))
    for i in range(5):
        got = recv_message(pair[1])
        assert got.meta == {"n": i} and torch.equal(got.tensors[0][1], torch.full((3,), float(i)))
    assert pair[1].buffered == 0


def test_frame_arriving_byte_by_byte_is_read_whole(pair):
    data = _encoded(Message(ops.PULL, {"k": "v"}, [("w", torch.arange(10.0))], request_id=3))

    def trickle() -> None:
        for i in range(len(data)):
            pair[0].sendall(data[i : i + 1])

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    got = recv_message(pair[1])
    sender.join(5)
    assert (got.request_id, got.meta) == (3, {"k": "v"})
    assert torch.equal(got.tensors[0][1], torch.arange(10.0))


def test_metadata_larger_than_the_buffer(pair):
    meta = {"blob": "x" * (2 * BUFFER_BYTES)}
    sender = send_in_background(pair[0], Message(ops.HELLO, meta), Message(ops.STATS, {}))
    assert recv_message(pair[1]).meta == meta
    assert recv_message(pair[1]).op == ops.STATS
    sender.join(5)


def test_large_frame_round_trip_then_socket_timeout(short_timeout_pair):
    big = torch.randn(600_000)  # larger than a socketpair's buffer: sent in several calls
    sender = send_in_background(short_timeout_pair[0], Message(ops.PULL, {}, [("w", big)]))
    got = recv_message(short_timeout_pair[1])
    sender.join(5)
    assert torch.equal(got.tensors[0][1], big)
    with pytest.raises(TimeoutError):  # nothing more is sent: the socket's timeout ends the wait
        recv_message(short_timeout_pair[1])


def test_deadline_ends_a_frame_that_keeps_trickling(short_timeout_pair):
    data = _encoded(Message(ops.PULL, {}, [("w", torch.zeros(1000))]))
    stop = threading.Event()

    def trickle() -> None:
        for i in range(len(data)):
            if stop.wait(0.05):
                return
            short_timeout_pair[0].sendall(data[i : i + 1])

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        with pytest.raises(TimeoutError):
            recv_message(short_timeout_pair[1], deadline=time.monotonic() + 0.5)
    finally:
        stop.set()
        sender.join(5)


def test_header_is_fixed_size():
    assert HEADER.size == struct.calcsize("!4sBBHQIQ") == 28


def test_a_tls_shards_notice_read_as_a_reply_says_tls(pair):
    """A client that sent a frame first, in plain text, to a TLS shard reads the shard's notice
    where it expects a reply: all of it fits a header, and says TLS."""
    from distbelief.errors import TLSMismatchError
    from distbelief.wire.security import SHARD_SPEAKS_TLS, SPEAKS_TLS_NOTICE

    sender, reader = pair
    sender.sendall(SPEAKS_TLS_NOTICE)
    sender.shutdown(socket.SHUT_WR)
    with pytest.raises(TLSMismatchError) as info:
        recv_message(reader)
    assert str(info.value) == SHARD_SPEAKS_TLS
