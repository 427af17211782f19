"""A fault-injecting TCP proxy for tests: it sits between clients and one server on loopback and,
when told, delays, stalls, cuts, drops bytes or partitions the network for a while.

One accept thread, and one thread per proxied connection that moves both directions with short
selects, so every thread notices a command or :meth:`FaultProxy.close` within milliseconds;
``close`` joins them all and fails if one is left. Each connection owns its sockets: only its
own thread reads, writes or closes them.
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import struct
import threading
import time
from types import TracebackType

from distbelief.wire.channels.tcp import parse_tcp_address

UP = "up"
"""Client to server."""
DOWN = "down"
"""Server to client."""

_POLL_S = 0.02
_CHUNK_BYTES = 64 * 1024
_MAX_BUFFERED_BYTES = 4 * 1024 * 1024
"""Per direction: past this the proxy stops reading, so a stalled sender blocks as on a network."""
_CONNECT_TIMEOUT_S = 2.0
_JOIN_TIMEOUT_S = 5.0


def _reset(sock: socket.socket) -> None:
    """Close with an RST, not a FIN: the peer sees ECONNRESET, as when a middlebox drops a
    connection's state."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Direction:
    """One direction of a proxied connection: chunks read from ``src`` wait here until they are
    due (the delay), then are written to ``dst``."""

    def __init__(self, name: str, src: socket.socket, dst: socket.socket) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.queued: collections.deque[tuple[float, bytes]] = collections.deque()
        self.out = bytearray()
        """Due bytes not written yet."""
        self.buffered = 0
        """Bytes held, queued or due."""
        self.eof = False
        """``src`` has shut its sending side."""
        self.shut = False
        """The end of stream has been passed on to ``dst``."""


class _Connection:
    """One proxied connection and the thread that moves its bytes."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.cut = False
        """Set by another thread: reset both sides and stop."""
        self.seen_epoch = -1
        """The proxy's command epoch this thread has acted on (see ``FaultProxy._settle``)."""
        self._sockets = (client, server)
        for sock in self._sockets:
            sock.setblocking(False)
        self._directions = (_Direction(UP, client, server), _Direction(DOWN, server, client))
        self.thread = threading.Thread(target=self._run, name="netproxy-connection", daemon=True)

    def _run(self) -> None:
        clean = False
        try:
            clean = self._move_bytes()
        except OSError:
            clean = False
        finally:
            for sock in self._sockets:
                if clean:
                    with contextlib.suppress(OSError):
                        sock.close()
                else:
                    _reset(sock)
            self.proxy._forget(self)

    def _move_bytes(self) -> bool:
        """Forward until both sides have closed (True) or the connection is cut (False)."""
        while not (self.cut or self.proxy._closing.is_set()):
            # The epoch first: a command changes the flags, then the epoch.
            epoch = self.proxy._epoch
            flowing = self.proxy.flowing
            self.seen_epoch = epoch
            now = time.monotonic()
            wait_s = _POLL_S
            for direction in self._directions:
                while flowing and direction.queued and direction.queued[0][0] <= now:
                    direction.out += direction.queued.popleft()[1]
                if flowing and direction.queued:
                    wait_s = min(wait_s, direction.queued[0][0] - now)
            if all(direction.shut for direction in self._directions):
                return True
            readers = [
                d.src
                for d in self._directions
                if flowing and not d.eof and d.buffered < _MAX_BUFFERED_BYTES
            ]
            writers = [d.dst for d in self._directions if flowing and d.out]
            readable, writable, _ = select.select(readers, writers, [], max(0.0, wait_s))
            for direction in self._directions:
                if direction.src in readable and not direction.eof:
                    self._read(direction)
                if direction.dst in writable and direction.out:
                    self._write(direction)
                if direction.eof and not direction.buffered and not direction.shut:
                    direction.dst.shutdown(socket.SHUT_WR)
                    direction.shut = True
        return False

    def _read(self, direction: _Direction) -> None:
        try:
            data = direction.src.recv(_CHUNK_BYTES)
        except BlockingIOError:
            return
        if not data:
            direction.eof = True
            return
        data = self.proxy._after_drop(direction.name, data)
        if data:
            direction.queued.append((time.monotonic() + self.proxy.delay_s, data))
            direction.buffered += len(data)

    def _write(self, direction: _Direction) -> None:
        try:
            sent = direction.dst.send(direction.out)
        except BlockingIOError:
            return
        del direction.out[:sent]
        direction.buffered -= sent
        self.proxy._count_forwarded(direction.name, sent)


class FaultProxy:
    """A TCP proxy on ``listen_host`` to the server at ``target`` that misbehaves on command.

    Commands act on the connections open at the time and on those made later:

    - :meth:`set_delay`: every chunk is held this long before it is forwarded (latency);
    - :meth:`stall` / :meth:`resume`: nothing is read or forwarded meanwhile, connections stay
      open and what was held is forwarded after the resume (a hung middlebox);
    - :meth:`cut`: every open connection is reset (RST both ways);
    - :meth:`drop`: the next bytes in one direction are discarded silently (the stream goes on
      without them: only the framing above TCP can notice);
    - :meth:`partition`: for a while, a stall that heals by itself (``refuse=False``: new
      connections are accepted but carry nothing, as behind a black hole), or every open
      connection is reset and new ones are reset at once (``refuse=True``).

    Args:
        target: The server, ``tcp://HOST:PORT``.
        listen_host: Where the proxy listens (on a free port).
        max_connections: More open connections than this are reset on arrival.
    """

    def __init__(
        self, target: str, *, listen_host: str = "127.0.0.1", max_connections: int = 64
    ) -> None:
        self.target = parse_tcp_address(target)
        self.max_connections = max_connections
        self.delay_s = 0.0
        self._stalled = False
        self._partition_until = 0.0
        self._refusing = False
        self._epoch = 0
        self._drop_bytes = {UP: 0, DOWN: 0}
        self.bytes_forwarded = {UP: 0, DOWN: 0}
        self.bytes_dropped = {UP: 0, DOWN: 0}
        self.connections_accepted = 0
        self.connections_refused = 0
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._closing = threading.Event()
        self._listener = socket.create_server((listen_host, 0))
        self._listener.settimeout(_POLL_S)
        host, port = self._listener.getsockname()[:2]
        self.address = f"tcp://{host}:{port}"
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="netproxy-accept", daemon=True
        )
        self._accept_thread.start()

    # -- commands ---------------------------------------------------------------------------

    def set_delay(self, delay_s: float) -> None:
        """Hold every chunk ``delay_s`` before forwarding it (0: no added latency)."""
        self.delay_s = delay_s

    def stall(self) -> None:
        """Stop reading and forwarding; connections stay open until :meth:`resume`. Once this
        returns, no open connection forwards another byte."""
        self._stalled = True
        self._settle()

    def resume(self) -> None:
        """Forward again, the held bytes first."""
        self._stalled = False

    def cut(self) -> int:
        """Reset every open connection; returns how many (each is gone when this returns)."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.cut = True
        for connection in connections:
            connection.thread.join(_JOIN_TIMEOUT_S)
        return len(connections)

    def drop(self, direction: str, num_bytes: int) -> None:
        """Discard the next ``num_bytes`` flowing in ``direction`` (UP or DOWN), whichever
        connection carries them."""
        if direction not in (UP, DOWN):
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, got {direction!r}")
        with self._lock:
            self._drop_bytes[direction] += num_bytes

    def partition(self, duration_s: float, *, refuse: bool = False) -> None:
        """Carry nothing for ``duration_s``, then heal by itself.

        Args:
            refuse: Reset the open connections and every new one until healed, instead of
                holding their bytes (a black hole, which delivers them after the heal).
        """
        with self._lock:
            self._refusing = refuse
            self._partition_until = time.monotonic() + duration_s
        if refuse:
            self.cut()
        else:
            self._settle()

    def heal(self) -> None:
        """End a partition now."""
        with self._lock:
            self._partition_until = 0.0

    @property
    def partitioned(self) -> bool:
        return time.monotonic() < self._partition_until

    @property
    def flowing(self) -> bool:
        """Whether bytes move now (not stalled, not partitioned)."""
        return not self._stalled and not self.partitioned

    @property
    def num_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- inner workings ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            refused = (self._refusing and self.partitioned) or (
                len(self._connections) >= self.max_connections
            )
            if refused:
                self.connections_refused += 1
        if refused:
            _reset(client)
            return
        try:
            server = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT_S)
        except OSError:
            _reset(client)
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(self, client, server)
        with self._lock:
            if self._closing.is_set():
                _reset(client)
                _reset(server)
                return
            # Started under the lock: whoever finds it in the set may join it.
            connection.thread.start()
            self._connections.add(connection)
            self.connections_accepted += 1

    def _settle(self) -> None:
        """Wait until every open connection has acted on the flags as they are now (a
        connection thread may be in the middle of forwarding when a command arrives)."""
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            with self._lock:
                behind = [c for c in self._connections if c.seen_epoch < epoch]
            if not behind:
                return
            time.sleep(_POLL_S / 4)

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _after_drop(self, direction: str, data: bytes) -> bytes:
        """``data`` less the bytes still to be dropped in ``direction`` (from its start)."""
        with self._lock:
            dropped = min(self._drop_bytes[direction], len(data))
            if not dropped:
                return data
            self._drop_bytes[direction] -= dropped
            self.bytes_dropped[direction] += dropped
        return data[dropped:]

    def _count_forwarded(self, direction: str, num_bytes: int) -> None:
        with self._lock:
            self.bytes_forwarded[direction] += num_bytes

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, reset every connection and join every thread of the proxy.

        Raises:
            RuntimeError: a thread did not stop within seconds (a bug in the proxy).
        """
        self._closing.set()
        self._accept_thread.join(_JOIN_TIMEOUT_S)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            threads = [connection.thread for connection in self._connections]
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in [self._accept_thread, *threads] if t.is_alive()]
        if alive:
            raise RuntimeError(f"proxy to {self.target}: {len(alive)} thread(s) did not stop")

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
