"""One connection on the server side, however the server schedules it (a thread of its own, or a
serving pool): the channel's handshake, frames read into the handler's buffers, dispatch through
the service's OpRegistry, exceptions turned into error replies, and the refusal of a connection
over the server's cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from distbelief.errors import UnknownOpError
from distbelief.wire.channels import Channel, Incoming, PollableChannel
from distbelief.wire.error_kinds import BAD_REQUEST, INTERNAL, TOO_MANY_CONNECTIONS, kind_of
from distbelief.wire.framing import RejectedFrame, Sink, send_message
from distbelief.wire.message import Message
from distbelief.wire.ops import OpRegistry, Route
from distbelief.wire.reader import FrameReader, recv_message

logger = logging.getLogger(__name__)


class ConnectionState(Protocol):
    """What a service keeps per connection (buffers, the peer's worker id).

    It may also define ``idle()``: a serving pool calls it each time the connection has been
    answered and waits for its next frame (buffers lent for one request can go back then).
    """

    def close(self) -> None:
        """The connection has ended (the peer left, or the server is stopping)."""


class Service(Protocol):
    """What a server runs: the ops it answers, and per-connection state for the handlers."""

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
            # A ProtocolError here refuses the frame: its tensors are skipped, the stream stays
            # usable.
            raise UnknownOpError(f"unknown op {request.op.name} (this server answers {served})")
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


def _refusal_kind(reason: Exception) -> str:
    """The error kind of a frame refused before its handler ran: a typed refusal's own (an
    unknown op, so that the client can say it reached another kind of server than it meant; a
    push to a shard holding no parameters), as a handler's would be; any other is a bad
    request, not a failure of the server's."""
    kind = kind_of(reason)
    return BAD_REQUEST if kind == INTERNAL else kind


def _refuse_frame(request: Message) -> None:
    raise ValueError("connection refused")  # skips the frame's tensors


class ServerConnection:
    """An accepted connection: opened (handshake) once, then served a frame at a time.

    Only the thread serving it reads, writes or closes it; any thread may ``shutdown`` it.

    Args:
        incoming: The accepted connection, its handshake not run yet.
        frame_timeout_s: Once a frame has started, the rest of it (and the reply) must go
            through within this time.
        max_payload_bytes: Frames with larger tensor parts are refused and the connection closed.
        refusal: Why the server refuses this connection (its first request is answered with
            this and the connection closed); None: served. May be decided later, by
            :meth:`open`'s ``admit``.
    """

    __slots__ = (
        "_dispatch",
        "_frame_timeout_s",
        "_idle",
        "_max_payload_bytes",
        "_state",
        "channel",
        "incoming",
        "peer",
        "reader",
        "refusal",
    )

    def __init__(
        self,
        incoming: Incoming,
        *,
        frame_timeout_s: float,
        max_payload_bytes: int,
        refusal: str | None = None,
    ) -> None:
        self.incoming = incoming
        self.peer = incoming.peer
        self.refusal = refusal
        self.channel: Channel | None = None
        self.reader: FrameReader | None = None
        self._frame_timeout_s = frame_timeout_s
        self._max_payload_bytes = max_payload_bytes
        self._state: ConnectionState | None = None
        self._dispatch: _Dispatch | None = None
        self._idle = None

    def open(
        self,
        service: Service,
        handshake_timeout_s: float,
        admit: Callable[[ServerConnection], str | None] | None = None,
    ) -> None:
        """The channel's handshake (TLS, job key), then ``admit`` (if given) decides the
        refusal, then the service's state for the connection (unless refused).

        Raises:
            ProtocolError: the peer failed authentication.
            OSError / TimeoutError: the connection failed or the peer was too slow.
        """
        channel = self.incoming.open(handshake_timeout_s)
        self.channel = channel
        channel.settimeout(self._frame_timeout_s)
        self.reader = FrameReader(channel)
        if admit is not None:
            self.refusal = admit(self)
        if self.refusal is None:
            self._state = service.open_connection(self.peer)
            self._dispatch = _Dispatch(service.handlers, self._state)
            self._idle = getattr(self._state, "idle", None)

    def serve_frame(self) -> None:
        """Read the frame that has started to arrive and send its answer.

        Raises:
            ProtocolError: the frame breaks the framing (the connection is unusable).
            OSError / TimeoutError: the connection failed, or the frame or its reply took longer
                than the frame timeout.
        """
        assert self.reader is not None and self.channel is not None
        dispatch = self._dispatch
        try:
            request = recv_message(
                self.reader,
                sink_for=_refuse_frame if dispatch is None else dispatch.sink_for,
                deadline=time.monotonic() + self._frame_timeout_s,
                max_payload_bytes=self._max_payload_bytes,
            )
        except RejectedFrame as e:
            if dispatch is None:
                reply = e.message.error_reply(TOO_MANY_CONNECTIONS, str(self.refusal))
            else:
                logger.warning("refused a request (%s): %s", e.message.op.name, e.reason)
                reply = e.message.error_reply(_refusal_kind(e.reason), str(e.reason))
        else:
            assert dispatch is not None
            reply = dispatch.answer(request)
        send_message(self.channel, reply, time.monotonic() + self._frame_timeout_s)

    def refuse(self, timeout_s: float) -> None:
        """Answer the first request (if one comes within ``timeout_s``) with the refusal.

        Raises:
            ProtocolError / OSError / TimeoutError: as :meth:`serve_frame`.
        """
        assert self.refusal is not None and self.reader is not None and self.channel is not None
        self.channel.settimeout(timeout_s)
        if self.reader.wait_for_frame():
            self.serve_frame()

    def pollable(self) -> bool:
        """Whether the OS can report this connection's arriving bytes (a PollableChannel)."""
        return callable(getattr(self.channel, "fileno", None))

    def has_buffered(self) -> bool:
        """Whether bytes of another frame were already received (a pipelining peer), so a
        poller would not report them."""
        assert self.reader is not None
        return self.reader.buffered > 0 or cast(PollableChannel, self.channel).pending() > 0

    def went_idle(self) -> None:
        """The connection is answered and waits for its next frame."""
        if self._idle is not None:
            self._idle()

    def shutdown(self) -> None:
        """Wake the thread blocked on this connection (safe from any thread)."""
        (self.incoming if self.channel is None else self.channel).shutdown()

    def close(self) -> None:
        """End the connection: the service's state first, then the channel."""
        state, self._state = self._state, None
        try:
            if state is not None:
                state.close()
        finally:
            (self.incoming if self.channel is None else self.channel).close()
