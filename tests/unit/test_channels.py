"""The channel registry by address scheme (nothing is dialled or bound here)."""

import os
import re

import pytest

from distbelief.errors import BindError
from distbelief.wire import channels, connect, serve
from distbelief.wire.channels.shm import (
    TRANSPORT_ENV,
    ShmDialer,
    apply_job_transport,
    set_transport,
)
from distbelief.wire.channels.tcp import TcpDialer, TcpListener, parse_tcp_address


def test_tcp_and_shm_are_registered():
    assert channels.channel_schemes() == ["shm", "tcp"]
    assert channels.local_address("tcp") == "tcp://127.0.0.1:0"
    assert channels.local_address("shm") == "shm://127.0.0.1:0"
    # tcp:// addresses are served by the shared-memory kind, which switches same-host peers.
    assert isinstance(channels.dialer("tcp://127.0.0.1:9"), ShmDialer)
    assert isinstance(channels.dialer("shm://127.0.0.1:9"), ShmDialer)


def test_only_a_registered_scheme_can_be_upgraded():
    with pytest.raises(ValueError, match="channel scheme 'udp' is not registered"):
        channels.upgrade_channel("udp", TcpDialer, TcpListener)


def test_a_scheme_registers_once():
    with pytest.raises(ValueError, match="channel scheme 'tcp' is already registered"):
        channels.register_channel("tcp", TcpDialer, TcpListener, local_address="tcp://127.0.0.1:0")


@pytest.mark.parametrize("entry", [channels.dialer, channels.listen, connect])
def test_unknown_scheme_names_the_address(entry):
    with pytest.raises(ValueError, match=r"address 'udp://x': unknown scheme 'udp' \(known: shm"):
        entry("udp://x")


def test_unknown_scheme_in_serve_names_the_address():
    with pytest.raises(ValueError, match="address 'udp://h:1': unknown scheme 'udp'"):
        serve("udp://h:1", None)
    with pytest.raises(ValueError, match="unknown scheme 'udp'"):
        channels.local_address("udp")


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [("tcp://10.0.0.1:7000", ("10.0.0.1", 7000)), ("h:1", ("h", 1)), ("tcp://[::1]:5", ("::1", 5))],
)
def test_tcp_addresses(address, endpoint):
    assert parse_tcp_address(address) == endpoint


@pytest.mark.parametrize(
    "address",
    [
        "tcp://nohost",
        "tcp://:1",
        "tcp://127.0.0.9:x",
        "tcp://[::1:1",
        "tcp://::1]:1",
        "tcp//127.0.0.9:7000",  # a slash is in no host name: not looked up as one
    ],
)
def test_malformed_tcp_address_is_named(address):
    with pytest.raises(ValueError, match=re.escape(f"address '{address}' is not of the form")):
        channels.dialer(address)


def test_a_host_no_lookup_knows_is_named():
    with pytest.raises(ValueError, match=r"host .nohost\.invalid. is not known here"):
        channels.dialer("tcp://nohost.invalid:7000")
    with pytest.raises(ValueError, match=r"host .nohost\.invalid. is not known here"):
        channels.dialer("shm://nohost.invalid:7000")


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:0", "shm://127.0.0.1:0"])
def test_port_0_is_refused_at_once_as_no_address_to_connect_to(address):
    """Every client (the CLI's --ps and --next, DownpourSGD, the examples) dials through here:
    none retries a port no server listens on until its retry timeout."""
    wanted = f"address '{address}': port 0 cannot be connected to"
    with pytest.raises(ValueError, match=re.escape(wanted)):
        channels.dialer(address)


def test_a_scripts_ps_list_is_checked_as_the_cli_checks_it():
    """``distbelief.check_ps_addresses``: what a user's own --ps flag is checked with."""
    from distbelief import check_ps_addresses

    given = " tcp://127.0.0.1:7000 , 127.0.0.1:7001"
    assert check_ps_addresses(given) == ["tcp://127.0.0.1:7000", "127.0.0.1:7001"]
    assert check_ps_addresses(["shm://127.0.0.1:7000"]) == ["shm://127.0.0.1:7000"]
    for bad, message in (
        ("", "no parameter-server address given"),
        ("tcp://127.0.0.1:7000,", "has an empty item"),
        ("tcp://127.0.0.1:0", "address 'tcp://127.0.0.1:0': port 0 cannot be connected to"),
        ("tcp://nohost.invalid:7000", "'tcp://nohost.invalid:7000': host 'nohost.invalid' is"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_ps_addresses(bad)
    with pytest.raises(TypeError, match=r"^ps must be"):
        check_ps_addresses(7000)  # type: ignore[arg-type]


def test_a_scripts_ps_list_refuses_shm_under_the_transport_tcp(monkeypatch):
    """As ``distbelief worker --ps`` and ``DownpourSGD(ps=...)`` do: with both, one of the shm://
    address and DISTBELIEF_TRANSPORT=tcp would be ignored without a word."""
    from distbelief import check_ps_addresses

    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    assert check_ps_addresses("tcp://127.0.0.1:7000") == ["tcp://127.0.0.1:7000"]
    wanted = (
        "ps: shm://127.0.0.1:7001 asks for shared memory, which DISTBELIEF_TRANSPORT=tcp "
        "rules out: give tcp://127.0.0.1:7001, or another DISTBELIEF_TRANSPORT"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(wanted)}$"):
        check_ps_addresses("tcp://127.0.0.1:7000,shm://127.0.0.1:7001")
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "shm")
    assert check_ps_addresses(["shm://127.0.0.1:7001"]) == ["shm://127.0.0.1:7001"]


def test_a_scripts_ps_list_names_a_bad_transport_as_the_variable(monkeypatch):
    """Not as a fault of the first address, which is well formed."""
    from distbelief import check_ps_addresses

    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "bogus")
    wanted = "DISTBELIEF_TRANSPORT 'bogus': must be one of auto, tcp, shm"
    with pytest.raises(ValueError, match=f"^{re.escape(wanted)}$"):
        check_ps_addresses("tcp://127.0.0.1:7000")


def test_a_port_out_of_range_is_named():
    with pytest.raises(ValueError, match="port 99999 is out of range"):
        channels.dialer("tcp://nohost:99999")


@pytest.mark.parametrize("address", ["shm://nohost", "shm://:1", "shm://h:x"])
def test_malformed_shm_address_is_named(address):
    with pytest.raises(ValueError, match=f"address '{address}' is not of the form shm://HOST:PORT"):
        channels.dialer(address)
    with pytest.raises(ValueError, match=f"address '{address}' is not of the form shm://HOST:PORT"):
        channels.listen(address)


def test_a_bad_transport_is_named(monkeypatch):
    monkeypatch.setenv(TRANSPORT_ENV, "udp")
    with pytest.raises(ValueError, match="DISTBELIEF_TRANSPORT 'udp': must be one of auto, tcp"):
        channels.dialer("tcp://127.0.0.1:9")
    with pytest.raises(ValueError, match="transport 'fast': must be one of auto, tcp, shm"):
        set_transport("fast")
    monkeypatch.delenv(TRANSPORT_ENV)
    with pytest.raises(ValueError, match="ring_bytes 10: must be in"):
        channels.dialer("shm://127.0.0.1:9", ring_bytes=10)


def test_the_job_transport_default_leaves_the_environment_in_place(monkeypatch):
    monkeypatch.setenv(TRANSPORT_ENV, "tcp")
    apply_job_transport("auto")
    assert os.environ[TRANSPORT_ENV] == "tcp"
    apply_job_transport("shm")
    assert os.environ[TRANSPORT_ENV] == "shm"
    monkeypatch.delenv(TRANSPORT_ENV)
    apply_job_transport("auto")
    assert os.environ[TRANSPORT_ENV] == "auto"
    monkeypatch.setenv(TRANSPORT_ENV, "bogus")  # left in place, so checked there
    with pytest.raises(ValueError, match="DISTBELIEF_TRANSPORT 'bogus': must be one of auto"):
        apply_job_transport("auto")


def test_an_address_without_its_scheme_is_named_as_given():
    with pytest.raises(ValueError, match="address 'garbage' is not of the form tcp://HOST:PORT"):
        channels.dialer("garbage")


def test_a_listener_on_an_ipv6_address_names_it_in_brackets():
    try:
        listener = TcpListener("tcp://[::1]:0")
    except (OSError, BindError) as e:  # a host without IPv6 loopback
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        assert re.fullmatch(r"tcp://\[::1\]:\d+", listener.address), listener.address
        assert parse_tcp_address(listener.address)[0] == "::1"
    finally:
        listener.close()


def test_a_peer_that_leaves_before_answering_the_challenge_was_not_refused():
    # A launcher's probe given up while the shard was stopped: the shard finds it gone when it
    # goes on. That ends the connection (an OSError, logged at debug), not a refusal of an
    # unauthenticated peer (a ProtocolError, logged as a warning).
    import socket

    from distbelief.errors import ProtocolError
    from distbelief.wire.security import WireSecurity

    listener = TcpListener("tcp://127.0.0.1:0", security=WireSecurity(auth_key=b"k" * 32))
    try:
        host, port = parse_tcp_address(listener.address)
        # Gone before the shard accepts it (the kernel completed its connect meanwhile).
        socket.create_connection((host, port), timeout=30).close()
        incoming = listener.accept(30)
        incoming.greet()
        with pytest.raises(OSError) as raised:
            incoming.open(30)
        assert not isinstance(raised.value, ProtocolError)
    finally:
        listener.close()
