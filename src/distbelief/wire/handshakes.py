"""Accepted connections until their handshake is done: a waiting room where they wait for the
peer's first bytes in one poller, and a few threads that run the handshakes of those whose
bytes have arrived.

Why a waiting room: a handshake thread that waited on each peer in arrival order let a few
dozen connections that never said a word (each held a thread until the handshake timeout) keep
every new worker out for minutes. A connection now gets a thread only once its peer has
answered in full (the channel says how much that is), so silent or stalling peers cost a
descriptor each until their timeout, and the others' handshakes go on meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import threading
import time
from collections.abc import Callable

from distbelief.wire.server_connection import ServerConnection

logger = logging.getLogger(__name__)

_HANDSHAKE_IDLE_S = 2.0
"""A handshake thread with nothing to do for this long ends."""
_POLL_S = 0.2
"""How often the waiting room looks at its deadlines and the stop flag."""
_STOP = object()
"""What ``stop`` queues once per thread: that thread ends at once (not when idle long
enough, as a thread whose wait for a connection timed out does)."""


class HandshakeQueue:
    """Runs accepted connections' handshakes on at most ``max_threads`` threads, started when
    needed and ended when idle. A connection whose channel can greet (``Incoming.greet``) first
    waits in the waiting room until its peer's reply has arrived, for at most ``wait_s``; then
    ``expire`` closes it. A peer slow to authenticate holds a thread for at most the handshake
    timeout, never the accepting thread or a serving thread.
    """

    def __init__(
        self,
        handshake: Callable[[ServerConnection], None],
        expire: Callable[[ServerConnection], None],
        *,
        max_threads: int,
        wait_s: float,
    ) -> None:
        self._handshake = handshake
        self._expire = expire
        self._max_threads = max_threads
        self._wait_s = wait_s
        self._queue: queue.SimpleQueue[ServerConnection | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._stopping = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._waiting: dict[ServerConnection, tuple[float, int]] = {}
        """Connections in the waiting room -> when they expire (``time.monotonic()``), and
        their descriptor."""
        self._room = threading.Thread(target=self._watch, name="handshake wait", daemon=True)
        self._room.start()

    def submit(self, connection: ServerConnection) -> None:
        """Run ``connection``'s handshake once its peer has said enough (at once if its
        channel cannot tell)."""
        greet = getattr(connection.incoming, "greet", None)
        if greet is None:
            self._start(connection)
            return
        try:
            descriptor = greet()
        except OSError as e:
            logger.debug("connection from %s ended: %s", connection.peer, e)
            self._expire(connection)
            return
        with self._lock:
            if self._stopping.is_set():
                stopped = True
            else:
                stopped = False
                self._waiting[connection] = (time.monotonic() + self._wait_s, descriptor)
                self._selector.register(descriptor, selectors.EVENT_READ, connection)
        if stopped:
            self._expire(connection)

    def _watch(self) -> None:
        """The waiting room: hands on connections whose peer answered, closes expired ones."""
        while not self._stopping.is_set():
            try:
                events = self._selector.select(_POLL_S)
            except OSError:  # closed by stop()
                return
            now = time.monotonic()
            answered, expired = [], []
            with self._lock:
                for key, _ in events:
                    if key.data in self._waiting:  # else stop() took it since the select
                        answered.append(key.data)
                        self._leave(key.data)
                for connection, (deadline, _) in list(self._waiting.items()):
                    if deadline <= now:
                        expired.append(connection)
                        self._leave(connection)
            for connection in answered:
                self._start(connection)
            for connection in expired:
                logger.debug("closing connection from %s: no handshake in time", connection.peer)
                self._expire(connection)

    def _leave(self, connection: ServerConnection) -> None:
        """Out of the waiting room (under the lock)."""
        _, descriptor = self._waiting.pop(connection)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(descriptor)

    def _start(self, connection: ServerConnection) -> None:
        with self._lock:
            # Once stopped, no thread takes it: a stop token left for a thread that had ended
            # idle would end a new one before it.
            stopped = self._stopping.is_set()
            if not stopped:
                if self._idle == 0 and len(self._threads) < self._max_threads:
                    thread = threading.Thread(target=self._run, name="handshake", daemon=True)
                    self._threads.add(thread)
                    self._idle += 1
                    thread.start()
                self._queue.put(connection)
        if stopped:
            self._expire(connection)

    def _run(self) -> None:
        while True:
            try:
                connection = self._queue.get(timeout=_HANDSHAKE_IDLE_S)
            except queue.Empty:
                connection = None
            with self._lock:
                if connection is None and not self._queue.empty():
                    continue  # submitted as this thread timed out: counted on it as idle
                self._idle -= 1
                if connection is None or connection is _STOP:
                    self._threads.discard(threading.current_thread())
                    return
            try:
                self._handshake(connection)
            finally:
                with self._lock:
                    self._idle += 1

    def stop(self, deadline: float) -> None:
        """Close the connections still waiting, and end every thread once the connections
        queued before have been handed to the handshake (which, with the server stopping,
        closes them)."""
        with self._lock:
            self._stopping.set()
            waiting = list(self._waiting)
            for connection in waiting:
                self._leave(connection)
            threads = list(self._threads)
        self._room.join(max(0.0, deadline - time.monotonic()))
        self._selector.close()
        for connection in waiting:
            self._expire(connection)
        for _ in threads:
            self._queue.put(_STOP)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
