"""Peers killed with SIGKILL on every channel kind (mid-frame; during the shared-memory
handshake), with no segment left in /dev/shm or mapped by the survivor; the fallbacks to TCP,
each with its log line; and the rings themselves.

The killed peers are real processes forked from the test process (they use sockets and
/dev/shm only, no torch): a spawned process would pay torch's import on every start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import multiprocessing as mp
import os
import random
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from distbelief.errors import ProtocolError, ShardUnavailableError
from distbelief.wire import Message, connect, ops, serve
from distbelief.wire.channels import dial, listen, local_address
from distbelief.wire.channels import shm as shm_channel
from distbelief.wire.channels.shm import ShmChannel
from distbelief.wire.channels.tcp import TcpChannel, TcpDialer, TcpListener
from distbelief.wire.message import HEADER, MAGIC, PROTOCOL_VERSION
from distbelief.wire.reader import FrameReader, recv_message
from tests.integration.test_transport import EchoService

PROMISED_BYTES = 50_000_000
SENT_BYTES = 1_000_000
CHILD_TIMEOUT_S = 60.0
RELEASE_TIMEOUT_S = 10.0
TRANSPORT = {"tcp": "tcp", "shm": "auto"}
"""The transport each forked peer passes explicitly (not through the environment)."""


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _files_of(pid: int) -> list[str]:
    """Segment files in /dev/shm named for connections that process ``pid`` accepted."""
    prefix = f"{shm_channel.SEGMENT_PREFIX}{pid}-"
    return sorted(name for name in os.listdir(shm_channel.SHM_DIR) if name.startswith(prefix))


def _mapped_segments() -> set[str]:
    """The segment files this process has mapped (unlinked ones included)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split()[-2] if line.endswith("(deleted)") else line.split()[-1] for line in lines}


def _our_segments() -> set[str]:
    """Ring segment files mapped here: files in /dev/shm (not the shared parameters' or push
    buffers' memory files, which other tests' shards and clients map and let go of)."""
    return {
        path
        for path in _mapped_segments()
        if os.path.dirname(path) == shm_channel.SHM_DIR
        and os.path.basename(path).startswith(shm_channel.SEGMENT_PREFIX)
    }


def _wait_until(condition, timeout_s: float = RELEASE_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def forked():
    """``forked(target, *args)``: a started forked process, and the parent's end of a pipe it
    was given as its first argument."""
    context = mp.get_context("fork")
    started = []

    def start(target, *args):
        parent_end, child_end = context.Pipe()
        process = context.Process(target=target, args=(child_end, *args), daemon=True)
        process.start()
        child_end.close()
        started.append(process)
        return process, parent_end

    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(CHILD_TIMEOUT_S)


def _receive(pipe, what: str):
    assert pipe.poll(CHILD_TIMEOUT_S), f"the forked peer did not send {what}"
    return pipe.recv()


# ---------------------------------------------------------------- killed mid-frame


def _push_part_of_a_frame_and_die(pipe, address: str, transport: str) -> None:
    channel = dial(address, timeout_s=10, transport=transport)
    channel.settimeout(10)
    pipe.send(type(channel).__name__)
    pipe.recv()  # the test has looked at the connection
    meta = b'{"tensors":[["w","uint8",[%d]]]}' % PROMISED_BYTES
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(ops.PUSH), 0, 1, len(meta), PROMISED_BYTES)
    channel.sendall(header + meta)
    channel.sendall(bytes(SENT_BYTES))
    _kill_self()


def test_a_client_killed_mid_frame_leaves_the_server_serving(scheme, forked):
    server = serve(local_address(scheme), EchoService())
    try:
        before = _our_segments()
        process, pipe = forked(_push_part_of_a_frame_and_die, server.address, TRANSPORT[scheme])
        assert (
            _receive(pipe, "its channel kind") == {"tcp": "TcpChannel", "shm": "ShmChannel"}[scheme]
        )
        # Both ends have mapped the connection's rings by now; the files are gone already.
        assert len(_our_segments() - before) == (2 if scheme == "shm" else 0)
        assert _files_of(os.getpid()) == []
        pipe.send("go")
        process.join(CHILD_TIMEOUT_S)
        assert process.exitcode == -signal.SIGKILL
        assert _wait_until(lambda: _our_segments() == before), "the server kept the rings mapped"
        client = connect(server.address, name="echo")
        assert client.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
        client.close()
    finally:
        server.stop()


def _reply_part_of_a_frame_and_die(pipe, scheme: str, transport: str) -> None:
    listener = listen(local_address(scheme), transport=transport)
    pipe.send(listener.address)
    channel = listener.accept(CHILD_TIMEOUT_S).open(10)
    channel.settimeout(10)
    request = recv_message(FrameReader(channel))
    meta = b'{"tensors":[["w","uint8",[%d]]]}' % PROMISED_BYTES
    header = HEADER.pack(
        MAGIC, PROTOCOL_VERSION, int(request.op), 1, request.request_id, len(meta), PROMISED_BYTES
    )
    channel.sendall(header + meta)
    channel.sendall(bytes(SENT_BYTES))
    _kill_self()


def test_a_server_killed_mid_reply_is_unavailable_at_once(scheme, forked):
    process, pipe = forked(_reply_part_of_a_frame_and_die, scheme, TRANSPORT[scheme])
    address = _receive(pipe, "its address")
    client = connect(address, name="shard 0")
    started = time.monotonic()
    with pytest.raises(ShardUnavailableError, match="shard 0: pull failed"):
        client.request(Message(ops.PULL), timeout_s=30)
    assert time.monotonic() - started < 10  # the peer's death, not the request's timeout
    process.join(CHILD_TIMEOUT_S)
    assert process.exitcode == -signal.SIGKILL
    assert _files_of(process.pid) == []
    assert not any(f"-{process.pid}-" in path for path in _our_segments())
    client.close()


# ---------------------------------------------------------------- killed in the handshake


def _create_the_offered_rings_and_die(pipe, tcp_address: str) -> None:
    tcp = TcpDialer(tcp_address)(10)
    sock = tcp.sock
    sock.sendall(shm_channel._REQUEST.pack(shm_channel.UPGRADE_MAGIC, 1, 1 << 20))
    assert sock.recv(1) == b"\x01"
    token, server_pid, ring_bytes = shm_channel._ACCEPT.unpack(
        shm_channel._recv_exact(sock, shm_channel._ACCEPT.size)
    )
    paths = shm_channel.segment_paths(server_pid, token.decode())
    for path in paths:
        shm_channel._create_segment(path, ring_bytes)
    pipe.send(paths)
    _kill_self()


def test_a_client_killed_after_creating_its_rings_leaves_no_file(forked, monkeypatch):
    monkeypatch.setenv(shm_channel.TRANSPORT_ENV, "auto")
    server = serve("shm://127.0.0.1:0", EchoService())
    try:
        tcp_address = server.address.replace("shm://", "tcp://")
        process, pipe = forked(_create_the_offered_rings_and_die, tcp_address)
        paths = _receive(pipe, "the rings it made")
        process.join(CHILD_TIMEOUT_S)
        assert process.exitcode == -signal.SIGKILL
        assert _wait_until(lambda: not any(os.path.exists(path) for path in paths))
        assert _files_of(os.getpid()) == []
    finally:
        server.stop()


def _offer_rings_and_die(pipe) -> None:
    listener = TcpListener("tcp://127.0.0.1:0")
    pipe.send(listener.address.replace("tcp://", "shm://"))
    sock = listener.accept(CHILD_TIMEOUT_S).open(10).sock
    sock.settimeout(10)
    shm_channel._recv_exact(sock, shm_channel._REQUEST.size)
    offer = shm_channel._ACCEPT.pack(b"0123456789abcdef", os.getpid(), 1 << 20)
    sock.sendall(b"\x01" + offer)
    shm_channel._recv_exact(sock, 1)  # the client has made the rings
    _kill_self()


def test_a_server_killed_before_mapping_the_rings_leaves_no_file(forked):
    process, pipe = forked(_offer_rings_and_die)
    address = _receive(pipe, "its address")
    before = _our_segments()
    with pytest.raises(OSError, match="shm handshake"):
        dial(address, timeout_s=10, transport="auto")
    process.join(CHILD_TIMEOUT_S)
    assert process.exitcode == -signal.SIGKILL
    assert _files_of(process.pid) == []
    assert _our_segments() == before


def test_a_new_listener_removes_segments_whose_server_died_long_ago():
    # Left by a handshake whose two ends were killed at once (nothing else leaves one).
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    old_s = time.time() - 2 * shm_channel.STALE_SEGMENT_S
    stale, live, recent = (
        shm_channel.segment_paths(pid, secrets.token_hex(8))
        for pid in (dead_pid, os.getpid(), dead_pid + 1)
    )
    try:
        for path in (*stale, *live, *recent):
            Path(path).write_bytes(b"")
            if path not in recent:
                os.utime(path, (old_s, old_s))
        listen("shm://127.0.0.1:0", transport="auto").close()
        assert [os.path.exists(path) for path in (*stale, *live, *recent)] == [False, False] + [
            True
        ] * 4
    finally:
        shm_channel._unlink((*stale, *live, *recent))


# ---------------------------------------------------------------- fallbacks


@contextlib.contextmanager
def _served(address: str, **options):
    server = serve(address, EchoService(), **options)
    try:
        yield server
    finally:
        server.stop()


def _check_round_trip(address: str, expected_kind: type, **options) -> None:
    client = connect(address, name="echo", **options)
    try:
        assert client.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
        assert type(client._channel) is expected_kind
    finally:
        client.close()


def test_tcp_between_processes_of_one_host_switches_to_shared_memory(monkeypatch):
    monkeypatch.setenv(shm_channel.TRANSPORT_ENV, "auto")
    with _served("tcp://127.0.0.1:0") as server:
        assert server.address.startswith("tcp://")
        _check_round_trip(server.address, ShmChannel)
        _check_round_trip(server.address, TcpChannel, transport="tcp")


def test_a_server_that_refuses_shared_memory_is_used_over_tcp(caplog):
    caplog.set_level(logging.INFO, logger=shm_channel.__name__)
    with _served("shm://127.0.0.1:0", transport="tcp") as server:
        _check_round_trip(server.address, TcpChannel, transport="shm")
    assert "the server refused shared memory; using TCP" in caplog.text
    assert "this process uses TCP only" in caplog.text


def test_without_dev_shm_the_client_stays_on_tcp(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(shm_channel, "SHM_DIR", str(tmp_path / "no-such-dir"))
    with _served("shm://127.0.0.1:0", transport="auto") as server:
        _check_round_trip(server.address, TcpChannel, transport="auto")
    assert f"this host has no {tmp_path / 'no-such-dir'}; using TCP" in caplog.text


def test_a_listener_holds_a_bounded_number_of_shared_memory_connections(caplog, monkeypatch):
    monkeypatch.setattr(shm_channel, "MAX_CHANNELS_PER_LISTENER", 1)
    caplog.set_level(logging.INFO, logger=shm_channel.__name__)
    with _served("shm://127.0.0.1:0", transport="auto") as server:
        first = connect(server.address, name="echo")
        assert first.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
        assert type(first._channel) is ShmChannel
        _check_round_trip(server.address, TcpChannel)
        assert "1 shared-memory connections are open already; using TCP" in caplog.text
        first.close()  # its grant comes back once the server has seen it go

        def shared_again() -> bool:
            client = connect(server.address, name="echo")
            client.request(Message(ops.HELLO), timeout_s=5)
            kind = type(client._channel)
            client.close()
            return kind is ShmChannel

        assert _wait_until(shared_again)


def test_rings_the_client_cannot_make_fall_back_to_tcp(caplog, monkeypatch):
    def full(path: str, size: int):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_channel, "_create_segment", full)
    with _served("shm://127.0.0.1:0", transport="auto") as server:
        _check_round_trip(server.address, TcpChannel, transport="auto")
    assert "cannot create shared memory ([Errno 28] No space left on device); using TCP" in (
        caplog.text
    )


def test_a_read_only_dev_shm_falls_back_to_tcp(caplog, monkeypatch):
    """A read-only mount refuses the unlink of a file it does not hold too (EROFS, not
    ENOENT): that error, from the handshake's cleanup, replaced its way back to TCP."""

    def read_only(path: str, *args):
        raise OSError(errno.EROFS, "Read-only file system", path)

    unlink = os.unlink

    def unlink_read_only(path, *args, **kwargs):
        if str(path).startswith(shm_channel.SHM_DIR):
            read_only(path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(shm_channel, "_create_segment", read_only)
    monkeypatch.setattr(os, "unlink", unlink_read_only)
    with _served("shm://127.0.0.1:0", transport="auto") as server:
        _check_round_trip(server.address, TcpChannel, transport="auto")
    assert "cannot create shared memory ([Errno 30] Read-only file system" in caplog.text


def test_rings_the_server_cannot_map_fall_back_to_tcp(caplog, monkeypatch):
    # What a server on another host sees: the segment files the client names do not exist.
    def missing(path: str, size: int):
        raise FileNotFoundError(f"no {path}")

    monkeypatch.setattr(shm_channel, "_open_segment", missing)
    with _served("shm://127.0.0.1:0", transport="auto") as server:
        _check_round_trip(server.address, TcpChannel, transport="auto")
    assert "the server could not map shared memory; using TCP" in caplog.text
    assert _files_of(os.getpid()) == []


# ---------------------------------------------------------------- the rings themselves


def _channel_pair(ring_bytes: int) -> tuple[ShmChannel, ShmChannel]:
    """Two ends of one shared-memory channel in this process (anonymous maps, a socketpair)."""
    left, right = socket.socketpair()
    for sock in (left, right):
        sock.settimeout(10)
    forward, backward = mmap.mmap(-1, ring_bytes), mmap.mmap(-1, ring_bytes)
    return (
        ShmChannel(left, shm_channel._Ring(forward), shm_channel._Ring(backward)),
        ShmChannel(right, shm_channel._Ring(backward), shm_channel._Ring(forward)),
    )


def test_bytes_arrive_in_order_across_wraps_and_full_rings():
    writer, reader = _channel_pair(64 * 1024)
    rng = random.Random(7)
    messages = [rng.randbytes(rng.choice([1, 100, 5000, 64 * 1024, 300_000])) for _ in range(60)]
    sender = threading.Thread(target=lambda: [writer.sendall(m) for m in messages])
    sender.start()
    expected = b"".join(messages)
    received = bytearray(len(expected))
    view, at = memoryview(received), 0
    while at < len(expected):
        count = reader.recv_into(view[at:], rng.choice([7, 4096, 100_000]))
        assert count > 0
        at += count
    sender.join(10)
    assert received == expected
    writer.close()
    assert reader.recv_into(bytearray(10)) == 0  # the writer's end closed: end of stream
    reader.close()


def test_a_doorbell_split_across_receives_is_kept():
    writer, reader = _channel_pair(64 * 1024)
    doorbell = shm_channel._CONTROL.pack(5)
    writer._out.view[:5] = b"hello"
    writer._sock.sendall(doorbell[:3])
    assert reader._wait() and reader._readable == 0
    writer._sock.sendall(doorbell[3:])
    buffer = bytearray(5)
    assert reader.recv_into(buffer) == 5 and buffer == b"hello"
    writer.close()
    reader.close()


def test_a_doorbell_beyond_the_ring_is_a_protocol_error():
    # What a middlebox that mangles the connection's bytes would ring.
    writer, reader = _channel_pair(64 * 1024)
    writer._sock.sendall(shm_channel._CONTROL.pack(10**9))
    with pytest.raises(ProtocolError, match="doorbells announce 1000000000 bytes"):
        reader.recv_into(bytearray(10))
    writer._sock.sendall(shm_channel._CONTROL.pack(-(10**9)))
    with pytest.raises(ProtocolError, match="the peer read more than was written"):
        reader.sendall(bytes(200_000))  # waits for room, and gets a report of too much
    writer.close()
    reader.close()
