"""The handshake waiting room stopped between its poller's answer and its taking the lock:
the connection stop() took is not taken again (a KeyError ended the room's thread with a
traceback on the shard's stderr)."""

from __future__ import annotations

import socket
import threading
import time

from distbelief.wire.handshakes import HandshakeQueue


class _Greeting:
    """Stands in for a server connection whose channel greets: its peer's reply is awaited on
    ``sock``."""

    peer = "127.0.0.1:1"

    def __init__(self, sock: socket.socket) -> None:
        self.incoming = self
        self._sock = sock

    def greet(self) -> int:
        return self._sock.fileno()


class _SelectThenWait:
    """The room's selector, whose select() waits, once it has an answer, until ``go`` is set."""

    def __init__(self, selector, go: threading.Event) -> None:
        self._selector = selector
        self._go = go
        self.entered = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._selector, name)

    def select(self, timeout: float):
        self.entered.set()
        events = self._selector.select(timeout)
        if events:
            self._go.wait(30)
        return events


def test_a_stop_between_the_rooms_select_and_its_lock_leaves_the_room_thread_clean():
    ours, peers = socket.socketpair()
    expired: list = []
    room = HandshakeQueue(lambda connection: None, expired.append, max_threads=1, wait_s=60)
    go = threading.Event()
    room._selector = selector = _SelectThenWait(room._selector, go)
    assert selector.entered.wait(30)  # the room polls through it from now on
    errors: list[BaseException] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        connection = _Greeting(ours)
        room.submit(connection)
        peers.send(b"x")  # the peer answers: the room's select sees it, and waits
        stopping = threading.Thread(target=room.stop, args=(time.monotonic() + 30,))
        stopping.start()
        while room._waiting:  # stop() has taken the connection out of the room
            time.sleep(0.01)
        go.set()
        stopping.join(60)
        assert not stopping.is_alive()
        assert errors == []
        assert expired == [connection]
    finally:
        threading.excepthook = hook
        go.set()
        ours.close()
        peers.close()


class _Plain:
    """Stands in for a server connection whose channel cannot greet: handshaken at once."""

    peer = "127.0.0.1:2"
    incoming = None


def test_stop_ends_every_handshake_thread_at_once(monkeypatch):
    # Each thread is told to end: not left to end once idle for a while, as every thread but
    # one was (the first to read the stop took the others' for timeouts of its own wait).
    monkeypatch.setattr("distbelief.wire.handshakes._HANDSHAKE_IDLE_S", 600.0)
    release, started = threading.Event(), threading.Semaphore(0)

    def handshake(connection) -> None:
        started.release()
        release.wait(60)

    room = HandshakeQueue(handshake, lambda connection: None, max_threads=3, wait_s=60)
    for _ in range(3):  # three threads, each in a handshake (a thread is added when none is idle)
        room.submit(_Plain())
        assert started.acquire(timeout=60)
    threads = list(room._threads)
    assert len(threads) == 3
    release.set()
    room.stop(time.monotonic() + 60)
    assert [thread for thread in threads if thread.is_alive()] == []


def test_a_connection_submitted_once_stopped_is_closed_not_queued():
    expired: list = []
    room = HandshakeQueue(lambda connection: None, expired.append, max_threads=2, wait_s=60)
    room.stop(time.monotonic() + 60)
    connection = _Plain()
    room.submit(connection)
    assert expired == [connection]
    assert room._threads == set()
