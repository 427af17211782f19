"""The server side of the request/reply layer, over any channel: an accept loop, one thread per
connection, frames read into the handler's buffers, dispatch through the service's OpRegistry,
and exceptions turned into error replies.

Threads, not selectors or asyncio: a shard serves a handful of long-lived connections (workers
and an evaluator), and both socket I/O and torch kernels release the GIL, so each connection's
receive, apply and send run in parallel without an event loop copying through Python buffers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from distbelief.errors import ProtocolError
from distbelief.wire import channels
from distbelief.wire.channels import Channel, Incoming
from distbelief.wire.error_kinds import BAD_REQUEST, INTERNAL, kind_of
from distbelief.wire.framing import RejectedFrame, Sink, send_message
from distbelief.wire.message import DEFAULT_MAX_PAYLOAD_BYTES, Message
from distbelief.wire.ops import OpRegistry, Route
from distbelief.wire.reader import FrameReader, recv_message

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.2
_HANDSHAKE_TIMEOUT_S = 5.0


class ConnectionState(Protocol):
    """What a service keeps per connection (buffers, the peer's worker id)."""

    def close(self) -> None:
        """The connection has ended (the peer left, or the server is stopping)."""


class Service(Protocol):
    """What :func:`serve` runs: the ops it answers, and per-connection state for the handlers."""

    handlers: OpRegistry
    """Op -> handler; each handler gets the state ``open_connection`` made for its connection."""

    def open_connection(self, peer: str) -> ConnectionState:
        """State for a new connection from ``peer``."""


class _Dispatch:
    """One connection's dispatch: the route is looked up once per request, when its metadata
    has arrived (to pick the buffers its tensors go into), and used again to answer it."""

    __slots__ = ("_route", "_routes", "_state")

    def __init__(self, handlers: OpRegistry, state: Any) -> None:
        self._routes = handlers.routes
        self._state = state
        self._route: Route | None = None

    def sink_for(self, request: Message) -> Sink | None:
        route = self._routes.get(request.op)
        if route is None:
            served = ", ".join(op.name for op in sorted(self._routes))
            # A ValueError here refuses the frame: its tensors are skipped, the stream stays usable.
            raise ValueError(f"unknown op {request.op.name} (this server answers {served})")
        self._route = route
        return None if route.sink_for is None else route.sink_for(self._state, request)

    def answer(self, request: Message) -> Message:
        assert self._route is not None
        try:
            return self._route.handler(self._state, request)
        except Exception as e:
            kind = kind_of(e)
            if kind == INTERNAL:
                logger.exception("request %s failed", request.op.name)
            return request.error_reply(kind, str(e))


class RpcServer:
    """Accepts connections and runs one thread per connection until :meth:`stop`.

    Args:
        address: Where to listen (``tcp://HOST:PORT``; port 0 picks a free one).
        service: The ops to answer and per-connection state.
        max_payload_bytes: Frames with larger tensor parts are refused and the connection closed.
        frame_timeout_s: Once a frame has started, the rest of it must arrive within this time.
        **channel_options: Passed to the channel's listener (``security`` for TCP).

    Raises:
        ValueError: ``address`` is malformed or its scheme unknown.
        ShardUnavailableError: ``address`` cannot be bound.
    """

    def __init__(
        self,
        address: str,
        service: Service,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        frame_timeout_s: float = 60.0,
        **channel_options,
    ) -> None:
        self._service = service
        self._max_payload_bytes = max_payload_bytes
        self._frame_timeout_s = frame_timeout_s
        self._stopping = threading.Event()
        self._open: set[Incoming | Channel] = set()
        """What stop() wakes: each connection's channel, or its Incoming until opened."""
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._listener = channels.listen(address, **channel_options)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"accept {self.address}", daemon=True
        )
        self._accept_thread.start()

    @property
    def address(self) -> str:
        """The address clients connect to (with the real port when bound to port 0)."""
        return self._listener.address

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                incoming = self._listener.accept(_IDLE_POLL_S)
            except TimeoutError:
                continue
            except OSError:
                break
            thread = threading.Thread(target=self._serve_connection, args=(incoming,), daemon=True)
            with self._lock:
                self._open.add(incoming)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _opened(self, incoming: Incoming) -> Channel | None:
        """The connection's channel once its handshake is done (None: the server stopped)."""
        channel = incoming.open(_HANDSHAKE_TIMEOUT_S)
        with self._lock:
            self._open.discard(incoming)
            if self._stopping.is_set():
                channel.close()
                return None
            self._open.add(channel)
        channel.settimeout(self._frame_timeout_s)
        return channel

    def _wait_for_frame(self, reader: FrameReader) -> bool:
        """Whether another frame has started to arrive (False once the peer closes or the
        server stops). Idle waits are bounded by the frame timeout, and :meth:`stop` ends them
        at once by shutting the channel down.
        """
        while not self._stopping.is_set():
            try:
                return reader.wait_for_frame()
            except TimeoutError:
                continue  # an idle connection: keep waiting
        return False

    def _serve_connection(self, incoming: Incoming) -> None:
        channel, state = None, None
        try:
            channel = self._opened(incoming)
            if channel is None:
                return
            reader = FrameReader(channel)
            state = self._service.open_connection(incoming.peer)
            dispatch = _Dispatch(self._service.handlers, state)
            while self._wait_for_frame(reader):
                self._serve_one(reader, dispatch)
        except ProtocolError as e:
            logger.warning("closing connection from %s: %s", incoming.peer, e)
        except OSError as e:  # ssl.SSLError included
            logger.debug("connection from %s ended: %s", incoming.peer, e)
        finally:
            if state is not None:
                state.close()
            with self._lock:
                self._open.discard(incoming)
                self._open.discard(channel)
            (incoming if channel is None else channel).close()

    def _serve_one(self, reader: FrameReader, dispatch: _Dispatch) -> None:
        deadline = time.monotonic() + self._frame_timeout_s
        try:
            request = recv_message(
                reader,
                sink_for=dispatch.sink_for,
                deadline=deadline,
                max_payload_bytes=self._max_payload_bytes,
            )
        except RejectedFrame as e:
            logger.warning("refused a %s request: %s", e.message.op.name, e.reason)
            reply = e.message.error_reply(BAD_REQUEST, str(e.reason))
        else:
            reply = dispatch.answer(request)
        send_message(reader.channel, reply, time.monotonic() + self._frame_timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every connection, join the server's threads (up to
        ``timeout_s`` in all)."""
        self._stopping.set()
        self._listener.close()
        with self._lock:
            for connection in self._open:
                connection.shutdown()  # each connection's own thread closes it
            threads = list(self._threads)
        deadline = time.monotonic() + timeout_s
        self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def serve(address: str, service: Service, **options) -> RpcServer:
    """Start serving ``service`` at ``address``; returns once it is bound.

    Args:
        address: Where to listen; its scheme picks the channel.
        service: The ops to answer and per-connection state.
        **options: ``max_payload_bytes``, ``frame_timeout_s`` and the channel's own options
            (``security``).

    Raises:
        ValueError: ``address`` is malformed or its scheme unknown.
        ShardUnavailableError: ``address`` cannot be bound.
    """
    return RpcServer(address, service, **options)
