"""The transport interface and the scheme -> backend registry.

Shards and optimizers see only ``Transport`` (client side) and ``RequestHandler`` (server side);
a backend (TCP today, same-host shared memory later) registers a connect and a serve factory.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol

from distbelief.wire.framing import Sink
from distbelief.wire.message import Message


class Transport(abc.ABC):
    """A client's connection to one server: one request at a time, each with a timeout."""

    @abc.abstractmethod
    def request(self, message: Message, *, timeout_s: float, sink: Sink | None = None) -> Message:
        """Send ``message`` and return the reply; tensors of the reply are read via ``sink``.

        Raises:
            ShardTimeoutError: no complete reply within ``timeout_s``.
            ShardUnavailableError: the server cannot be reached or dropped the connection.
            ProtocolError: the reply is not a valid frame.
            RemoteError: the server answered with an error.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the connection; a later request reconnects."""


class ConnectionHandler(Protocol):
    """Server-side logic for one client connection (per-connection buffers live here)."""

    def sink_for(self, request: Message) -> Sink | None:
        """Where the tensors of ``request`` (op and metadata parsed, no tensors yet) go."""

    def handle(self, request: Message) -> Message:
        """Answer one request; raise ValueError/PSError to send an error reply."""

    def close(self) -> None:
        """The connection has ended (the peer left, or the server is stopping)."""


class RequestHandler(Protocol):
    """Server-side logic: makes one ConnectionHandler per accepted connection."""

    def open_connection(self, peer: str) -> ConnectionHandler: ...


class Server(abc.ABC):
    """A running server bound to an address."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The address clients connect to (with the real port when bound to port 0)."""

    @abc.abstractmethod
    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every connection, join the server's threads."""


ConnectFactory = Callable[..., Transport]
ServeFactory = Callable[..., Server]
_BACKENDS: dict[str, tuple[ConnectFactory, ServeFactory]] = {}


def register_backend(scheme: str, connect: ConnectFactory, serve: ServeFactory) -> None:
    """Make ``scheme://...`` addresses use this backend."""
    _BACKENDS[scheme] = (connect, serve)


def split_scheme(address: str) -> tuple[str, str]:
    """``"tcp://h:p"`` -> ``("tcp", "h:p")``; an address without a scheme is TCP."""
    scheme, sep, rest = address.partition("://")
    return (scheme, rest) if sep else ("tcp", address)


def _backend(address: str) -> tuple[ConnectFactory, ServeFactory]:
    scheme, _ = split_scheme(address)
    if scheme not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS))
        raise ValueError(f"address {address!r}: unknown scheme {scheme!r} (known: {known})")
    return _BACKENDS[scheme]


def connect(address: str, *, name: str | None = None, **options) -> Transport:
    """A transport to ``address`` (connects lazily, on the first request)."""
    return _backend(address)[0](address, name=name or address, **options)


def serve(address: str, handler: RequestHandler, **options) -> Server:
    """Start serving ``handler`` at ``address``; returns once the socket is bound."""
    return _backend(address)[1](address, handler, **options)
