"""Host addresses as users type them: whether a text is an IP address or a host name, and
whether it is an address of this machine. Standard library only (the launcher and the config
use it without loading torch)."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def is_host(text: str) -> bool:
    """Whether ``text`` is an IP address (v4 or v6) or a host name: no port, no scheme, and
    not dotted numbers that are no IPv4 address (127.0.0.300)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text.removesuffix(".").split(".")
    if labels[-1].isdigit():
        return False
    return len(text) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def check_local_host(host: str) -> None:
    """Raise ValueError unless ``host`` is an address of this machine (one a socket can bind).

    Raises:
        ValueError: naming ``host`` and why (unknown name, not this machine's address).
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind(address)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ValueError(f"{host} is not an address of this machine ({reason})") from e
    except UnicodeError as e:  # a label too long for a host name: the lookup's encoding
        raise ValueError(f"host {host!r} is not a valid host name ({e})") from e
    # Linux lets a TCP socket bind a multicast or the broadcast address, which no connection
    # ever reaches (nor leaves from).
    ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        kind = "a multicast" if ip.is_multicast else "the broadcast"
        raise ValueError(
            f"{host} is not an address of this machine ({kind} address: no connection reaches it)"
        )


_FAMILY_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def _families(host: str) -> set[int]:
    """The address families ``host`` has (both for a name that resolves to both)."""
    return {info[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}


def check_reachable_from(host: str, source_host: str) -> None:
    """Raise ValueError when no connection can leave ``source_host`` for ``host``: they have
    no address family in common (an IPv6 source for an IPv4 shard). A lookup that fails passes
    (the hosts' own checks name that).

    Raises:
        ValueError: naming both hosts and their families.
    """
    try:
        theirs, ours = _families(host), _families(source_host)
    except (OSError, UnicodeError):
        return
    if theirs and ours and not theirs & ours:

        def named(families: set[int]) -> str:
            return "/".join(sorted(_FAMILY_NAMES.get(f, str(f)) for f in families))

        raise ValueError(
            f"connections cannot leave {source_host} ({named(ours)}) for {host} "
            f"({named(theirs)}): give hosts of one address family"
        )


class UnknownHostError(ValueError):
    """No host of the name given can be looked up, or the name is not a host name: a typo.
    Its own type so that an argument naming hosts among others (``ps=``) can name itself."""


def check_known_host(host: str) -> None:
    """Raise UnknownHostError when no host of this name can be looked up (a typo). A lookup
    that fails for now (a name server away) passes: the connection's retries wait for it.

    Raises:
        UnknownHostError: naming ``host`` and the resolver's reason.
    """
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise UnknownHostError(f"host {host!r} is not known here ({e.strerror})") from e
    except UnicodeError as e:
        raise UnknownHostError(f"host {host!r} is not a valid host name ({e})") from e


def parse_addresses(addresses: str | Sequence[str], what: str = "addresses") -> list[str]:
    """``"tcp://a:1,tcp://b:2"`` or a list -> list of addresses; ValueError if empty or one
    item is, TypeError (naming the argument, ``what``) if neither."""
    if not isinstance(addresses, str) and not (
        isinstance(addresses, Sequence) and all(isinstance(item, str) for item in addresses)
    ):
        raise TypeError(
            f"{what} must be 'tcp://HOST:PORT,...' or a list of such strings, got {addresses!r}"
        )
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    items = [item.strip() for item in items]
    if not any(items):
        raise ValueError("no parameter-server address given (e.g. tcp://127.0.0.1:7000)")
    if "" in items:  # a slip (two commas, one too many), or a shard's address left out
        shown = addresses if isinstance(addresses, str) else ",".join(addresses)
        raise ValueError(f"the list {shown!r} has an empty item")
    for item in items:
        if any(character.isspace() for character in item):
            raise ValueError(f"{item!r} holds a space: separate addresses with commas")
    return items
