"""A command's flags checked after parsing, before anything is written or started: the
addresses of --ps, --bind and --next, a worker's stage flags, the device and the connection
settings read from the environment. Each refusal is one error naming the flag (or the
variable); nothing here starts a process or imports torch unless a GPU is asked for.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from distbelief.config import JobConfig
from distbelief.errors import BindError, ConfigFieldError


def check_device(config: JobConfig) -> None:
    """Refuse a GPU this machine does not have before any process starts."""
    if config.cluster.device == "cpu":
        return
    from distbelief.worker.run import resolve_device  # torch: only when a GPU is asked for

    try:
        resolve_device(config.cluster.device)
    except ValueError as e:
        raise ConfigFieldError("cluster.device", str(e).partition(": ")[2]) from None


def check_environment() -> None:
    """The connection settings read from the environment (``DISTBELIEF_TRANSPORT``), checked
    before anything is written or started.

    Raises:
        ValueError: a bad value, named as the variable (no flag set it).
    """
    from distbelief.wire.channels.shm import transport_setting

    transport_setting()


def flag_addresses(flag: str, text: str, check: Callable[[str], object] | None = None) -> list[str]:
    """The addresses of ``flag``; one that ``check`` refuses (by default: one a dialer refuses,
    malformed, of port 0, or of a host no lookup knows) is an error naming the flag."""
    from distbelief.wire.channels import checked_addresses

    try:
        return checked_addresses(text, check)
    except ValueError as e:
        raise argparse.ArgumentError(None, f"argument {flag}: {e}") from e


def one_address(flag: str, text: str, check: Callable[[str], object] | None = None) -> str:
    """The one address of ``flag`` (stripped, as --ps's are); a malformed one, or several, is
    an error naming the flag."""
    addresses = flag_addresses(flag, text, check)
    if len(addresses) > 1:
        raise argparse.ArgumentError(None, f"argument {flag}: one address, not {len(addresses)}")
    return addresses[0]


def check_bind_is_here(text: str) -> str:
    """--bind: a well-formed address of this machine whose port is free (a foreign address or
    a port another process holds is bad input, not a failure of the server; port 0 takes any
    free one). Returns it, as the server binds it."""
    from distbelief.hosts import check_local_host
    from distbelief.wire.channels.tcp import (
        TcpListener,
        check_address_form,
        parse_tcp_address,
        tcp_endpoint,
    )

    # Not a dialer's check: port 0 is fine here.
    address = one_address("--bind", text, check_address_form)
    tcp_address = tcp_endpoint(address)  # what the server binds, whatever scheme
    host, _ = parse_tcp_address(tcp_address)
    try:
        check_local_host(host)
        # Before torch loads; a port taken meanwhile is refused the same way (BindError).
        TcpListener(tcp_address).close()
    except (ValueError, BindError) as e:
        raise argparse.ArgumentError(None, f"argument --bind: {e}") from None
    return address


def check_no_shm_under_tcp(flag: str, addresses: Sequence[str], config: JobConfig) -> None:
    """An shm:// address asks for shared memory, which the transport tcp rules out: with both,
    one of them would be ignored without a word."""
    from distbelief.wire.channels.shm import shm_address_ruled_out

    ruled_out = shm_address_ruled_out(addresses, config.cluster.transport)
    if ruled_out is not None:
        address, tcp_address = ruled_out
        raise argparse.ArgumentError(
            None,
            f"argument {flag}: {address} asks for shared memory, which --transport tcp "
            f"(or DISTBELIEF_TRANSPORT=tcp) rules out: give {tcp_address}, or another "
            "--transport",
        )


def check_stage_flags(args: argparse.Namespace, num_stages: int) -> None:
    """--stage, --bind and --next: each given where it is used, and only there. Stages after
    the first listen (--bind) for the one before; stages before the last dial the next
    (--next)."""
    if num_stages == 1:
        given = (("--stage", args.stage), ("--bind", args.bind), ("--next", args.next))
        flag, value = next((flag, value) for flag, value in given if value is not None)
        raise ValueError(
            f"{flag} {value}: only applies to a stage of a partitioned replica (--partitions)"
        )
    if args.stage is None:
        raise ValueError(
            f"--stage is required with --partitions {num_stages} (the partition this process "
            f"runs, in [0, {num_stages}))"
        )
    if not 0 <= args.stage < num_stages:
        raise ValueError(f"--stage {args.stage} is not in [0, --partitions {num_stages})")
    if args.stage < num_stages - 1 and not args.next:
        raise ValueError(
            f"--stage {args.stage} needs --next (the address of stage {args.stage + 1})"
        )
    if args.stage == num_stages - 1 and args.next:
        raise ValueError(f"--next {args.next}: the last stage has no next stage")
    if args.stage == 0 and args.bind:
        raise ValueError(f"--bind {args.bind}: the first stage does not listen (it dials --next)")
    if args.stage > 0 and not args.bind:
        raise ValueError(
            f"--stage {args.stage} needs --bind (where stage {args.stage - 1} connects)"
        )
    if args.next:
        args.next = one_address("--next", args.next)
    if args.bind:
        args.bind = check_bind_is_here(args.bind)
