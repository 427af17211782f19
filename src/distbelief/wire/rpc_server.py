"""The server side of the request/reply layer, over any channel: the accept loop, the cap on
connections (with a refusal the client sees), the bound on connections still in their job-key
handshake, the file-descriptor limit, and one of two ways to schedule connections, each serving
frames with the same code (``server_connection.py``):

- ``"pool"``: idle connections wait in epoll; a few serving threads answer whichever
  connection's frame arrives, in arrival order (``serving_pool.py``). Holds thousands of
  replicas per shard with a fixed number of threads and no per-connection stack.
- ``"threads"``: a thread per connection, blocked on its socket. Simplest; every thread's
  receive, apply and send run in parallel (socket I/O and torch kernels release the GIL). For
  services whose handlers wait for each other without ``long_wait`` (long polls), and for a
  platform without epoll.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from distbelief.config import SERVER_DESIGNS
from distbelief.errors import ProtocolError
from distbelief.wire import channels
from distbelief.wire.fd_limit import FD_HEADROOM, raise_fd_limit
from distbelief.wire.handshakes import HandshakeQueue
from distbelief.wire.message import DEFAULT_MAX_PAYLOAD_BYTES
from distbelief.wire.server_connection import ConnectionState, ServerConnection, Service
from distbelief.wire.serving_pool import POOL_AVAILABLE, STALL_S, ServingPool

__all__ = ["SERVER_DESIGNS", "ConnectionState", "RpcServer", "Service", "serve"]

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.2
_HANDSHAKE_TIMEOUT_S = 5.0
_HANDSHAKE_THREADS = 8
_REFUSALS_IN_FLIGHT = 64
"""Refused connections still being answered; past these (and the cap) the accept loop waits,
so the descriptors a server holds stay bounded."""
_HANDSHAKES_IN_FLIGHT = 1024
"""Connections to a shard with a job key still in their handshake. The cap does not count them
(peers without the key must not take key holders' places): past these, or once the connections
open fill the cap's descriptors (and the refusals'), the oldest is closed to make room. So
silent peers hold bounded descriptors (and, with a thread per connection, threads), and keep
out no key holder, whose handshake takes milliseconds."""
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def default_serving_threads() -> int:
    """Serving threads of a pool: a few per core (socket I/O and torch kernels release the GIL,
    so a thread waiting on either leaves the core to another)."""
    return min(32, 4 * (os.cpu_count() or 1))


class RpcServer:
    """Accepts connections and serves them until :meth:`stop`.

    Args:
        address: Where to listen (``tcp://HOST:PORT``; port 0 picks a free one).
        service: The ops to answer and per-connection state.
        design: ``"pool"`` or ``"threads"`` (module docstring). A pool needs epoll and
            channels with descriptors (TCP); elsewhere a thread per connection serves.
        max_connections: At most this many connections are served at once; past it a new
            connection's first request is answered with ``TooManyConnectionsError`` and the
            connection closed. With a job key (``security``) a connection counts once it has
            passed the handshake; those still in it are bounded apart (oldest closed first,
            see ``_HANDSHAKES_IN_FLIGHT``).
            The process's open-file limit is raised to fit it (or the cap lowered to fit the
            limit, with a warning). None: no cap.
        serving_threads: A pool's active serving threads (default: a few per core).
        stall_s: On a pool, a request still being served after this long (a peer stalled
            mid-frame) has its thread replaced while it lasts.
        max_payload_bytes: Frames with larger tensor parts are refused and the connection closed.
        frame_timeout_s: Once a frame has started, the rest of it must arrive within this time.
        **channel_options: Passed to the channel's listener (``security`` for TCP).

    Raises:
        ValueError: ``address`` is malformed or its scheme unknown, or an option is out of
            range.
        ShardUnavailableError: ``address`` cannot be bound.
    """

    def __init__(
        self,
        address: str,
        service: Service,
        *,
        design: str = "pool",
        max_connections: int | None = None,
        serving_threads: int | None = None,
        stall_s: float = STALL_S,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        frame_timeout_s: float = 60.0,
        **channel_options,
    ) -> None:
        if design not in SERVER_DESIGNS:
            raise ValueError(f"server design {design!r}: choose one of {', '.join(SERVER_DESIGNS)}")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if serving_threads is not None and serving_threads < 1:
            raise ValueError(f"serving_threads must be >= 1, got {serving_threads}")
        self._service = service
        self._max_payload_bytes = max_payload_bytes
        self._frame_timeout_s = frame_timeout_s
        # Only a job key tells peers apart: without one, a connection counts once accepted.
        security = channel_options.get("security")
        self._keyed = getattr(security, "auth_key", None) is not None
        self._max_connections = _fit_to_fd_limit(max_connections)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[ServerConnection] = set()
        """Every connection not closed yet: what stop() wakes."""
        self._served: set[ServerConnection] = set()
        """Connections counted toward the cap (neither refused nor still in the handshake)."""
        self._unauthenticated: dict[ServerConnection, None] = {}
        """With a job key: connections still in their handshake, oldest first."""
        self._closed_one = threading.Event()
        """Set as a connection closes: a full accept loop looks again."""
        self._threads: list[threading.Thread] = []
        self._listener = channels.listen(address, **channel_options)
        self._pool: ServingPool | None = None
        self._handshakes: HandshakeQueue | None = None
        if design == "pool" and not POOL_AVAILABLE:
            logger.warning("no epoll on this platform: serving a thread per connection")
        elif design == "pool":
            self._pool = ServingPool(
                self._serve_ready,
                self._close,
                self._release_from_pool,
                num_threads=serving_threads or default_serving_threads(),
                max_threads=(self._max_connections or 1 << 16) + 64,
                name=f"serve {self.address}",
                stall_s=stall_s,
            )
            self._handshakes = HandshakeQueue(
                self._open_for_pool,
                self._close,
                max_threads=_HANDSHAKE_THREADS,
                wait_s=_HANDSHAKE_TIMEOUT_S,
            )
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"accept {self.address}", daemon=True
        )
        self._accept_thread.start()

    @property
    def address(self) -> str:
        """The address clients connect to (with the real port when bound to port 0)."""
        return self._listener.address

    @property
    def design(self) -> str:
        """How this server schedules its connections (``"pool"`` or ``"threads"``)."""
        return "threads" if self._pool is None else "pool"

    @property
    def max_connections(self) -> int | None:
        """The cap in force (perhaps lowered to fit the open-file limit)."""
        return self._max_connections

    @property
    def num_connections(self) -> int:
        """Connections served now (refused ones and those still in the handshake not counted)."""
        return len(self._served)

    def _full(self) -> bool:
        """Whether the connections open fill the descriptors of the cap and of the refusals in
        flight; the oldest one still in its handshake, if any, is then closed to make room."""
        cap = self._max_connections
        if cap is None or len(self._connections) < cap + _REFUSALS_IN_FLIGHT:
            return False
        self._close_oldest_handshake()
        return True

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            self._closed_one.clear()
            if self._full():
                self._closed_one.wait(0.05)  # new peers wait in the listen backlog meanwhile
                continue
            try:
                incoming = self._listener.accept(_IDLE_POLL_S)
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno not in _OUT_OF_DESCRIPTORS:
                    break  # the listener is closed
                logger.warning("cannot accept a connection: %s; waiting for one to close", e)
                self._stopping.wait(0.1)
                continue
            self._admit(incoming)

    def _admit(self, incoming: channels.Incoming) -> None:
        connection = ServerConnection(
            incoming,
            frame_timeout_s=self._frame_timeout_s,
            max_payload_bytes=self._max_payload_bytes,
        )
        with self._lock:
            self._connections.add(connection)
            if not self._keyed:
                connection.refusal = self._count(connection)
            else:  # counted by _authenticated once its handshake has passed
                self._unauthenticated[connection] = None
            too_many = len(self._unauthenticated) > _HANDSHAKES_IN_FLIGHT
        _log_refusal(connection.peer, connection.refusal)
        if too_many:
            self._close_oldest_handshake()
        if self._handshakes is not None:
            self._handshakes.submit(connection)
        else:
            self._start_thread(connection)

    def _close_oldest_handshake(self) -> None:
        """Make room: close the connection longest in its handshake (a key holder's takes
        milliseconds: the oldest is the likeliest to be a peer that never answers)."""
        with self._lock:
            if not self._unauthenticated:
                return
            oldest = next(iter(self._unauthenticated))
            del self._unauthenticated[oldest]
        logger.debug("closing connection from %s: too many handshakes", oldest.peer)
        oldest.shutdown()  # its thread (or the waiting room) sees it gone, and closes it

    def _count(self, connection: ServerConnection) -> str | None:
        """Count ``connection`` toward the cap, or say why it is refused (under the lock)."""
        cap = self._max_connections
        num_served = len(self._served)
        if cap is None or num_served < cap:
            self._served.add(connection)
            return None
        served = f"{num_served} connection" + ("s" if num_served != 1 else "")
        return f"the server already serves {served}, its limit (--max-connections {cap})"

    def _authenticated(self, connection: ServerConnection) -> str | None:
        """A connection through the job-key handshake: counted toward the cap now, or refused
        past it (one made room for meanwhile is counted too: it holds the key)."""
        with self._lock:
            self._unauthenticated.pop(connection, None)
            refusal = self._count(connection)
        _log_refusal(connection.peer, refusal)
        return refusal

    def _start_thread(self, connection: ServerConnection, opened: bool = False) -> None:
        thread = threading.Thread(
            target=self._serve_in_thread, args=(connection, opened), daemon=True
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _opened(self, connection: ServerConnection) -> bool:
        """Run the handshake; False: the server is stopping (the caller closes)."""
        if self._stopping.is_set():
            return False
        admit = self._authenticated if self._keyed else None
        connection.open(self._service, _HANDSHAKE_TIMEOUT_S, admit)
        if connection.refusal is not None:
            connection.refuse(_HANDSHAKE_TIMEOUT_S)
            return False
        return not self._stopping.is_set()

    def _open_for_pool(self, connection: ServerConnection) -> None:
        assert self._pool is not None
        try:
            if not self._opened(connection):
                self._close(connection)
            elif not connection.pollable():
                self._start_thread(connection, opened=True)  # no descriptor to poll
            elif not self._pool.add(connection):
                self._close(connection)
            return
        except ProtocolError as e:
            logger.warning("closing connection from %s: %s", connection.peer, e)
        except OSError as e:  # ssl.SSLError and TimeoutError included
            logger.debug("connection from %s ended: %s", connection.peer, e)
        except Exception:
            logger.exception("opening the connection from %s failed", connection.peer)
        self._close(connection)

    def _serve_ready(self, connection: ServerConnection) -> bool | None:
        """A pool's turn on a connection whose frame has started. True: watch it again;
        False: close it; None: it is no longer pollable (its channel switched to shared
        memory), so a thread of its own serves it from now on and the pool lets it go."""
        assert connection.reader is not None
        try:
            if not connection.reader.wait_for_frame():
                return False  # the peer closed
            connection.serve_frame()
            if not connection.pollable():
                return None  # the pool lets it go to _release_from_pool
            while connection.has_buffered():  # frames a peer pipelined: no poller reports them
                connection.serve_frame()
            connection.went_idle()
            return True
        except ProtocolError as e:
            logger.warning("closing connection from %s: %s", connection.peer, e)
        except OSError as e:
            logger.debug("connection from %s ended: %s", connection.peer, e)
        except Exception:  # a bug below: it must not end a serving thread
            logger.exception("serving the connection from %s failed", connection.peer)
        return False

    def _release_from_pool(self, connection: ServerConnection) -> None:
        """A connection the pool can no longer watch gets a thread of its own."""
        self._start_thread(connection, opened=True)

    def _wait_for_frame(self, connection: ServerConnection) -> bool:
        """Whether another frame has started to arrive (False once the peer closes or the
        server stops). Idle waits are bounded by the frame timeout, and :meth:`stop` ends them
        at once by shutting the channel down.
        """
        assert connection.reader is not None
        while not self._stopping.is_set():
            try:
                return connection.reader.wait_for_frame()
            except TimeoutError:
                continue  # an idle connection: keep waiting
        return False

    def _serve_in_thread(self, connection: ServerConnection, opened: bool = False) -> None:
        """A thread's whole life with one connection (``opened``: its handshake is done)."""
        try:
            if opened or self._opened(connection):
                while self._wait_for_frame(connection):
                    connection.serve_frame()
        except ProtocolError as e:
            logger.warning("closing connection from %s: %s", connection.peer, e)
        except OSError as e:  # ssl.SSLError included
            logger.debug("connection from %s ended: %s", connection.peer, e)
        finally:
            self._close(connection)

    def _close(self, connection: ServerConnection) -> None:
        with self._lock:
            if connection not in self._connections:
                return
            self._connections.discard(connection)
            self._served.discard(connection)
            self._unauthenticated.pop(connection, None)
        connection.close()
        self._closed_one.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every connection, join the server's threads (up to
        ``timeout_s`` in all)."""
        deadline = time.monotonic() + timeout_s
        self._stopping.set()
        self._listener.close()
        self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for connection in self._connections:
                connection.shutdown()  # the thread serving it, if any, closes it
            threads = list(self._threads)
        if self._handshakes is not None:
            self._handshakes.stop(deadline)
        if self._pool is not None:
            self._pool.stop(deadline)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _log_refusal(peer: str, refusal: str | None) -> None:
    if refusal is not None:
        logger.warning("refusing a connection from %s: %s", peer, refusal)


def _fit_to_fd_limit(max_connections: int | None) -> int | None:
    """The cap, lowered to what the open-file limit allows once raised as far as it goes."""
    if max_connections is None:
        return None
    limit = raise_fd_limit(max_connections + _REFUSALS_IN_FLIGHT + FD_HEADROOM)
    if limit is None:
        return max_connections
    fits = max(1, limit - _REFUSALS_IN_FLIGHT - FD_HEADROOM)
    if fits < max_connections:
        logger.warning(
            "serving at most %d connections, not %d: the open-file limit is %d",
            fits,
            max_connections,
            limit,
        )
        return fits
    return max_connections


def serve(address: str, service: Service, **options) -> RpcServer:
    """Start serving ``service`` at ``address``; returns once it is bound.

    Args:
        address: Where to listen; its scheme picks the channel.
        service: The ops to answer and per-connection state.
        **options: ``design``, ``max_connections``, ``serving_threads``, ``stall_s``,
            ``max_payload_bytes``, ``frame_timeout_s`` and the channel's own options
            (``security``).

    Raises:
        ValueError: ``address`` is malformed or its scheme unknown, or an option out of range.
        ShardUnavailableError: ``address`` cannot be bound.
    """
    return RpcServer(address, service, **options)
