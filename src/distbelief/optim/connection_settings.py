"""Where a replica finds its shards and how it talks to them: the shard addresses (``ps`` or
``DISTBELIEF_PS``), the per-request timeout and the job's key, each from its argument or its
environment variable. Checks and resolves values only; it opens no connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from distbelief.client import parse_addresses
from distbelief.config import MAX_WAIT_S, amount_problem, check_wait, environment_setting
from distbelief.hosts import UnknownHostError
from distbelief.wire import channels
from distbelief.wire.channels.shm import check_shm_allowed, transport_setting
from distbelief.wire.channels.tcp import check_dial_address_form
from distbelief.wire.security import read_key_file

PS_ADDRESS_ENV = "DISTBELIEF_PS"
"""Comma-separated shard addresses, used when ``ps`` is not given."""
TIMEOUT_ENV = "DISTBELIEF_TIMEOUT_S"
"""Per-request timeout in seconds, used when ``timeout_s`` is not given."""
DEFAULT_TIMEOUT_S = 30.0
AUTH_KEY_FILE_ENV = "DISTBELIEF_AUTH_KEY_FILE"
"""Path of the job's key file, used when ``auth_key`` is not given."""


def _key_from_environment() -> bytes | None:
    """The key of the file ``DISTBELIEF_AUTH_KEY_FILE`` names, if set; ValueError naming the
    variable if the file is missing or no key file."""
    path = environment_setting(AUTH_KEY_FILE_ENV)
    if not path:
        return None
    try:
        return read_key_file(path)
    except ValueError as e:
        raise ValueError(f"{AUTH_KEY_FILE_ENV}: {e}") from None


def _key_bytes(auth_key: bytes | str | None) -> bytes | None:
    """``auth_key`` as the key's bytes: given as bytes, or as the hex text a key file holds
    (``distbelief keygen`` writes one; its text read as str or bytes is taken as that key)."""
    if auth_key is None:
        return None
    if not isinstance(auth_key, bytes | str):
        raise TypeError(
            f"auth_key must be bytes or a str (a key file's hex text), got {auth_key!r}"
        )
    text = auth_key.decode("ascii", "replace") if isinstance(auth_key, bytes) else auth_key
    if not text.strip():
        # An empty key file's text, say: no secret, which would have connected with no key.
        raise ValueError("auth_key is empty: give the job's key, or None for no key")
    try:
        return bytes.fromhex(text.strip())
    except ValueError:
        if isinstance(auth_key, bytes):
            return auth_key  # the raw key
        raise ValueError("auth_key: a str must be a hex key (a key file's text)") from None


def request_timeout_s(timeout_s: float | None) -> float:
    """``timeout_s`` as given, or when not given (None) ``DISTBELIEF_TIMEOUT_S``, else 30.

    Raises:
        ValueError: ``timeout_s`` is not > 0 (0 is no default), or ``DISTBELIEF_TIMEOUT_S``
            is no number of seconds > 0.
    """
    if timeout_s is not None:
        check_wait("timeout_s", timeout_s)
        return timeout_s
    text = environment_setting(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        timeout_s = float(text)
    except ValueError:
        timeout_s = float("nan")
    problem = amount_problem(timeout_s, most=MAX_WAIT_S)
    if problem is not None:
        raise ValueError(f"{TIMEOUT_ENV} {text!r}: {problem} (seconds)")
    return timeout_s


def check_optional_str(name: str, value: object) -> None:
    """Refuses ``value`` unless it is a str or None.

    Raises:
        TypeError: naming ``name``.
    """
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")


def check_worker_id(worker_id: object) -> None:
    """Refuses a ``worker_id`` that is not a str or None, or is empty: an empty one read as
    none given, and each life then got a new one, which the shards know nothing of (no
    ``pushed_steps`` to resume after).

    Raises:
        TypeError / ValueError: naming ``worker_id``.
    """
    check_optional_str("worker_id", worker_id)
    if worker_id == "":
        raise ValueError(
            "worker_id is empty: give the replica's name, or None for one of this process's own"
        )


def check_optional_callback(name: str, value: object) -> None:
    """Refuses ``value`` unless it can be called, or is None: a callback is first called
    only once a push has been applied, deep inside a later ``step()`` or ``close()``.

    Raises:
        TypeError: naming ``name``.
    """
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function (or None), got {value!r}")


@contextlib.contextmanager
def hosts_of_ps_named(ps: str | Sequence[str] | None) -> Iterator[None]:
    """A host that cannot be looked up inside (the client's connecting, after every other
    argument is checked) is named as ``ps``'s, when ``ps`` gave it."""
    try:
        yield
    except UnknownHostError as e:
        if ps is None:  # DISTBELIEF_PS's were looked up and named before; or a server's own
            raise
        raise UnknownHostError(f"ps: {e}") from None


def ps_addresses(ps: str | Sequence[str] | None) -> list[str]:
    """The shard addresses of ``ps`` (a list or comma-separated), or when not given (None)
    ``DISTBELIEF_PS``'s.

    Raises:
        TypeError: ``ps`` is neither a str nor a list of str.
        ValueError: no address given, by either; a bad ``DISTBELIEF_TRANSPORT`` (named).
    """
    if ps is not None:
        try:
            # Their scheme and form; their hosts are looked up once every other argument is
            # checked.
            addresses = channels.checked_addresses(ps, check_dial_address_form, "ps")
        except ValueError as e:
            raise ValueError(f"ps: {e}") from None
        return check_shm_allowed("ps", addresses)
    text = environment_setting(PS_ADDRESS_ENV) or ""
    if not text.replace(",", "").strip():
        raise ValueError(
            f"no parameter-server address given: pass ps= or set {PS_ADDRESS_ENV} "
            "(e.g. tcp://127.0.0.1:7000)"
        )
    # The dialers below read DISTBELIEF_TRANSPORT: a bad value is refused first, as that
    # variable's, not as a fault of DISTBELIEF_PS.
    transport_setting()
    try:
        addresses = parse_addresses(text, PS_ADDRESS_ENV)
        for address in addresses:
            channels.dialer(address)  # its form and host, named as the variable holds them
    except ValueError as e:
        raise ValueError(f"{PS_ADDRESS_ENV}: {e}") from None
    return check_shm_allowed(PS_ADDRESS_ENV, addresses)
