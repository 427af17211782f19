"""Channels: connected, bounded byte streams, found by the scheme of an address.

A channel only moves bytes: request ids, deadlines and error kinds live above it (rpc.py). Each
module in this package is one kind of channel and registers its scheme when imported; every
module here is imported with the package, so a new kind (same-host shared memory) is one file.
A kind may also take over another scheme's addresses (``upgrade_channel``): shared memory serves
``tcp://`` ones, switching a connection over where both ends are on one host.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from distbelief.hosts import parse_addresses


class Channel(Protocol):
    """One connected byte stream (what frames are read from and written to).

    Every blocking call is bounded by the timeout last set with ``settimeout`` and raises
    ``TimeoutError`` past it; a failed or reset connection raises ``OSError``.
    """

    def sendall(self, data: bytes | bytearray | memoryview, /) -> None:
        """Write all of ``data``."""

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        """Receive at most ``nbytes`` (0: the buffer's size); 0 means the peer closed."""

    def settimeout(self, timeout_s: float, /) -> None:
        """Bound every later blocking call by ``timeout_s``."""

    def shutdown(self) -> None:
        """Wake any thread blocked on this channel (it sees end of stream or an error); safe from
        another thread, unlike ``close``, which only the thread using the channel may call."""

    def close(self) -> None:
        """Shut the stream down and release it."""


class PeerSilent(TimeoutError):
    """The peer took the connection, then answered nothing of a channel's handshake in time:
    a shard stopped or too busy to answer, or another program that waits for a request of its
    own protocol (many web servers wait for a whole request line)."""


def shares_memory(channel: Channel | None) -> bool:
    """Whether ``channel``'s two ends are on one host and may share memory. A channel kind
    that knows it says so with a ``shares_memory`` attribute, and has ``peer_closed()``: a
    check, without blocking, that the peer has not closed (memory shared over the channel is
    the peer's for as long as it is open)."""
    return bool(getattr(channel, "shares_memory", False))


class PollableChannel(Channel, Protocol):
    """A channel the OS can watch for arriving bytes (a socket): a server then keeps it idle in
    a poller, with no thread waiting on it."""

    def fileno(self) -> int:
        """The descriptor to watch for readable bytes."""

    def pending(self) -> int:
        """Bytes received and decoded below the channel (by TLS) that the OS no longer reports
        as readable."""


class Incoming(Protocol):
    """A connection a listener accepted, not yet opened: its handshake runs on another thread
    than the accepting one (the connection's own, or one of a few handshake threads), so a slow
    or hostile peer never holds up the accepting thread."""

    peer: str
    """Who connected, for logs.

    An incoming connection may also define ``greet() -> int``: the server's first words (if it
    speaks first), then a descriptor that polls readable once the peer's reply has arrived. A
    server then waits for many connections' first bytes in one poller, without a thread each,
    and a peer that connects and stays silent holds up no other's handshake.
    """

    def open(self, timeout_s: float) -> Channel:
        """Finish the channel's own handshake (TLS, job key) within ``timeout_s``.

        Raises:
            ProtocolError: the peer failed authentication.
            OSError / TimeoutError: the connection failed or the peer was too slow.
        """

    def shutdown(self) -> None:
        """Wake a thread blocked in :meth:`open` (safe from another thread)."""

    def close(self) -> None:
        """Drop the connection."""


class Listener(Protocol):
    """A bound endpoint that accepts connections."""

    @property
    def address(self) -> str:
        """The address clients dial (with the real port when bound to port 0)."""

    def accept(self, timeout_s: float) -> Incoming:
        """The next connection.

        Raises:
            TimeoutError: none arrived within ``timeout_s``.
            OSError: the listener is closed.
        """

    def close(self) -> None:
        """Stop accepting; a thread blocked in :meth:`accept` gets an OSError."""


Dialer = Callable[[float], Channel]
"""Opens a new channel to one address within the given seconds; raises ProtocolError (the peer
failed authentication), TimeoutError or OSError."""


class ChannelKind(NamedTuple):
    """How to reach and offer one scheme's addresses."""

    dialer: Callable[..., Dialer]
    """``dialer(address, **options)``: checks the address and options, returns a Dialer."""
    listen: Callable[..., Listener]
    """``listen(address, **options)``: binds and returns a Listener."""
    local_address: str
    """An address on this host at which ``listen`` binds a free endpoint."""


_kinds: dict[str, ChannelKind] = {}


def register_channel(
    scheme: str,
    dialer: Callable[..., Dialer],
    listen: Callable[..., Listener],
    *,
    local_address: str,
) -> None:
    """Make ``scheme://...`` addresses use this kind of channel.

    Raises:
        ValueError: ``scheme`` is already registered.
    """
    if scheme in _kinds:
        raise ValueError(f"channel scheme {scheme!r} is already registered")
    _kinds[scheme] = ChannelKind(dialer, listen, local_address)


def upgrade_channel(
    scheme: str, dialer: Callable[..., Dialer], listen: Callable[..., Listener]
) -> None:
    """Serve ``scheme``'s addresses with another kind's dialer and listener: ones that open
    ``scheme``'s own channels and switch them to a faster kind where both ends can.

    Raises:
        ValueError: ``scheme`` is not registered yet.
    """
    if scheme not in _kinds:
        raise ValueError(f"channel scheme {scheme!r} is not registered")
    _kinds[scheme] = _kinds[scheme]._replace(dialer=dialer, listen=listen)


def split_scheme(address: str) -> tuple[str, str]:
    """``"tcp://h:p"`` -> ``("tcp", "h:p")``; an address without a scheme is TCP."""
    scheme, sep, rest = address.partition("://")
    return (scheme, rest) if sep else ("tcp", address)


def _kind(address: str) -> ChannelKind:
    scheme, _ = split_scheme(address)
    if scheme not in _kinds:
        known = ", ".join(sorted(_kinds))
        raise ValueError(f"address {address!r}: unknown scheme {scheme!r} (known: {known})")
    return _kinds[scheme]


def check_scheme(address: str) -> None:
    """Refuses an address whose scheme no channel kind registered (ValueError naming it)."""
    _kind(address)


def channel_schemes() -> list[str]:
    """The registered schemes, sorted."""
    return sorted(_kinds)


def local_address(scheme: str) -> str:
    """An address of ``scheme`` on this host that :func:`listen` binds to a free endpoint.

    Raises:
        ValueError: ``scheme`` is not registered.
    """
    return _kind(f"{scheme}://").local_address


def dialer(address: str, **options) -> Dialer:
    """A dialer for ``address`` (checked now; each call opens a new channel).

    Raises:
        ValueError: the address is malformed or its scheme unknown (naming the address).
    """
    return _kind(address).dialer(address, **options)


def checked_addresses(
    addresses: str | Sequence[str],
    check: Callable[[str], object] | None = None,
    what: str = "addresses",
) -> list[str]:
    """The addresses of ``addresses`` (comma-separated or a list), stripped, each passed to
    ``check`` (by default :func:`dialer`'s checks, which connect nothing).

    Raises:
        TypeError: ``addresses`` is neither a str nor a list of str (naming ``what``).
        ValueError: none given, an empty item, or one ``check`` refuses, named as given.
    """
    items = parse_addresses(addresses, what)
    for address in items:
        try:
            (check or dialer)(address)
        except ValueError as e:
            # Named as given (a dialer may name it with its scheme added, or name its host only).
            raise ValueError(e if repr(address) in str(e) else f"{address!r}: {e}") from e
    return items


def check_ps_addresses(ps: str | Sequence[str]) -> list[str]:
    """The parameter-server shard addresses of ``ps``, in order, checked as ``distbelief
    worker --ps`` checks them: for a script's own ``--ps`` flag, refused before anything starts.

    ``ps`` is what ``DownpourSGD(ps=...)`` and ``ShardedEmbeddings(ps=...)`` take: a
    comma-separated string (``"tcp://10.0.0.1:7000,tcp://10.0.0.2:7000"``) or a list. Each
    address must be ``tcp://HOST:PORT`` or ``shm://HOST:PORT`` (no scheme: tcp), of a port other
    than 0 and a host a lookup knows (a lookup that fails for now passes). Connects nothing:
    shards that are down, or given in another order, are found when the client connects.

    Returns:
        The addresses, stripped of surrounding spaces.

    Raises:
        TypeError: ``ps`` is neither a str nor a list of str.
        ValueError: no address, an empty item, a bad address (the message names it), an
            ``shm://`` one under ``DISTBELIEF_TRANSPORT=tcp``, or a bad ``DISTBELIEF_TRANSPORT``.
    """
    # Imported here: the shm channel module imports this package's registry.
    from distbelief.wire.channels.shm import check_shm_allowed, transport_setting

    # The dialers read DISTBELIEF_TRANSPORT: a bad value is refused first, as that variable's,
    # not as a fault of the first address.
    transport_setting()
    return check_shm_allowed("ps", checked_addresses(ps, what="ps"))


def dial(address: str, *, timeout_s: float, **options) -> Channel:
    """A new channel to ``address``, opened within ``timeout_s``.

    Raises:
        ValueError: the address is malformed or its scheme unknown.
        ProtocolError: the peer failed authentication.
        TimeoutError / OSError: the peer could not be reached in time.
    """
    return dialer(address, **options)(timeout_s)


def listen(address: str, **options) -> Listener:
    """Bind ``address`` and accept connections there.

    Raises:
        ValueError: the address is malformed or its scheme unknown.
        BindError: the address cannot be bound (a ShardUnavailableError).
    """
    return _kind(address).listen(address, **options)


# Last, once the registry above exists: each channel module registers itself on import.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
