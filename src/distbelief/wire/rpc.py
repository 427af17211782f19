"""The client side of the request/reply layer, over any channel: request ids, a deadline per
request, reconnecting on the next request after a failure, and typed errors.

The server side is rpc_server.py; channels (channels/) only move bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import time

from distbelief.errors import (
    AuthenticationError,
    NotAPeerError,
    ProtocolError,
    PSError,
    ShardTimeoutError,
    ShardUnavailableError,
)
from distbelief.wire import channels
from distbelief.wire.channels import Channel, PeerSilent
from distbelief.wire.error_kinds import TOO_MANY_CONNECTIONS, error_for_kind
from distbelief.wire.framing import RejectedFrame, Sink, send_message
from distbelief.wire.message import Message
from distbelief.wire.reader import FrameReader, recv_message


def _op_name(message: Message) -> str:
    return message.op.name.lower()


_SILENT = (
    ": the peer took the connection but answered nothing (a shard stopped or too busy to "
    "answer, or another program that waits for a request of its own protocol: a web server, "
    "say)"
)


class _ConnectTimeout(TimeoutError):
    """Opening the channel (connect, TLS, job key) took longer than its own bound, which may
    be shorter than the request's."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no connection within {timeout_s:g}s")
        self.timeout_s = timeout_s


class RpcClient:
    """A client's connection to one server: one request at a time, each with a timeout.

    Connects on the first request, and again on the next request after any failure. A frame
    that does not parse, once this server has answered well, is taken for bytes lost or mangled
    on the way (a misbehaving middlebox), not for a peer of another kind: it fails like a lost
    connection, which callers retry.

    Args:
        address: Where the server listens (``tcp://HOST:PORT``).
        name: How errors name the server (e.g. ``"shard 1 (tcp://...)"``).
        connect_timeout_s: Limit for opening the channel.
        **channel_options: Passed to the channel's dialer (``security`` for TCP).

    Raises:
        ValueError: ``address`` is malformed or its scheme unknown.
    """

    def __init__(
        self, address: str, *, name: str, connect_timeout_s: float = 5.0, **channel_options
    ) -> None:
        self.address = address
        self.name = name
        self._dialer = channels.dialer(address, **channel_options)
        self._connect_timeout_s = connect_timeout_s
        self._channel: Channel | None = None
        self._reader: FrameReader | None = None
        self._call_timeout_s = 0.0
        """The per-call bound currently set on ``_channel`` (a syscall to change)."""
        self._request_ids = itertools.count(1)
        self._answered = False
        """Whether the server has answered a request well (it is a peer of this protocol)."""

    @property
    def memory_channel(self) -> Channel | None:
        """The connection open now if its peer is on this host and may share memory (see
        ``channels.shares_memory``); None otherwise, or while none is open."""
        channel = self._channel
        return channel if channels.shares_memory(channel) else None

    def _open(self, deadline: float, timeout_s: float) -> tuple[Channel, FrameReader]:
        if self._channel is None:
            remaining_s = deadline - time.monotonic()
            connect_s = max(0.001, min(self._connect_timeout_s, remaining_s))
            try:
                channel = self._dialer(connect_s)
            except TimeoutError as e:
                if connect_s < remaining_s:  # else the request's own timeout ran out
                    raise _ConnectTimeout(connect_s) from e
                raise
            try:
                channel.settimeout(timeout_s)
            except BaseException:
                channel.close()
                raise
            self._channel, self._reader = channel, FrameReader(channel)
            self._call_timeout_s = timeout_s
        elif self._call_timeout_s != timeout_s:
            self._channel.settimeout(timeout_s)
            self._call_timeout_s = timeout_s
        assert self._reader is not None
        return self._channel, self._reader

    def request(self, message: Message, *, timeout_s: float, sink: Sink | None = None) -> Message:
        """Send ``message`` and return the reply; tensors of the reply are read via ``sink``.

        Raises:
            ShardTimeoutError: no complete reply within ``timeout_s``, or no connection within
                the connect timeout (the message names the bound that ran out).
            ShardUnavailableError: the server cannot be reached or dropped the connection, or
                the stream broke the protocol after the server had answered well before.
            ProtocolError: the reply is not a valid frame, or the server failed authentication
                or speaks TLS where this client does not, or the reverse (before it ever
                answered well: AuthenticationError, TLSMismatchError).
            RemoteError: the server answered with an error (a subclass per error kind).
        """
        deadline = time.monotonic() + timeout_s
        message.request_id = next(self._request_ids)
        try:
            channel, reader = self._open(deadline, timeout_s)
            send_message(channel, message, deadline)
            reply = recv_message(reader, sink_for=lambda _reply: sink, deadline=deadline)
        except _ConnectTimeout as e:
            self.close()
            silent = _SILENT if isinstance(e.__cause__, PeerSilent) else ""
            raise ShardTimeoutError(
                f"{self.name}: {_op_name(message)} timed out after {e.timeout_s:g}s connecting"
                f"{silent}"
            ) from e
        except TimeoutError as e:
            self.close()
            # Connected, and never answered: whether it is a shard at all is not known yet.
            silent = "" if self._answered else _SILENT
            raise ShardTimeoutError(
                f"{self.name}: {_op_name(message)} timed out after {timeout_s:g}s{silent}"
            ) from e
        except RejectedFrame as e:
            raise ProtocolError(f"{self.name}: {_op_name(message)} reply refused: {e}") from e
        except ProtocolError as e:
            self.close()
            raise self._broken_stream(message, str(e), type(e)) from e
        except OSError as e:
            self.close()
            raise ShardUnavailableError(f"{self.name}: {_op_name(message)} failed: {e}") from e
        if reply.request_id != message.request_id:
            self.close()
            raise self._broken_stream(message, f"reply to request {reply.request_id}")
        self._answered = True
        if reply.is_error:
            kind = reply.meta.get("error", "remote")
            if kind == TOO_MANY_CONNECTIONS:
                self.close()  # the server closes a refused connection: the next request redials
            raise error_for_kind(kind)(
                f"{self.name}: {_op_name(message)} refused: {reply.meta.get('message', kind)}"
            )
        return reply

    def _broken_stream(
        self, message: Message, problem: str, kind: type[ProtocolError] = ProtocolError
    ) -> PSError:
        """The error for a frame (or handshake) that broke the protocol: a ProtocolError the
        first time (another kind of peer, another version, another job's key), a lost
        connection once this server has answered well (bytes lost on the way)."""
        if self._answered:
            return ShardUnavailableError(
                f"{self.name}: {_op_name(message)}: the connection broke the protocol "
                f"({problem}); reconnecting"
            )
        # An AuthenticationError stays one, of its kind (the command line names the key file
        # or the TLS flag for it), and so does a NotAPeerError (it names the address's flag).
        kind = kind if issubclass(kind, (AuthenticationError, NotAPeerError)) else ProtocolError
        return kind(f"{self.name}: {_op_name(message)}: {problem}")

    def interrupt(self) -> None:
        """Wake a request blocked on the connection (it fails as a lost connection); safe from
        another thread, unlike :meth:`close`."""
        channel = self._channel
        if channel is not None:
            channel.shutdown()

    def close(self) -> None:
        """Drop the connection; a later request reconnects."""
        channel, self._channel, self._reader = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.close()


def connect(address: str, *, name: str | None = None, **options) -> RpcClient:
    """A client of the server at ``address`` (connects lazily, on the first request).

    Args:
        address: The server's address; its scheme picks the channel.
        name: How errors name the server (default: the address).
        **options: ``connect_timeout_s`` and the channel's own options (``security``).

    Raises:
        ValueError: ``address`` is malformed or its scheme unknown.
    """
    return RpcClient(address, name=name or address, **options)
