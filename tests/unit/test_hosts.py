"""Host addresses as users type them: IP addresses and host names pass, ports, schemes and bad
dotted numbers do not; an address not of this machine is refused by name, naming its flag's
field."""

import pytest

from distbelief.config import ClusterConfig
from distbelief.errors import ConfigFieldError
from distbelief.hosts import check_local_host, check_reachable_from, is_host
from distbelief.launch.hosts import check_hosts_are_here, check_workers_reach

NOT_HERE = "192.0.2.1"
"""TEST-NET-1 (RFC 5737): never an address of a real machine."""


@pytest.mark.parametrize("text", ["127.0.0.2", "10.0.0.1", "::1", "localhost", "node-1.lan"])
def test_addresses_and_names_are_hosts(text):
    assert is_host(text)


@pytest.mark.parametrize(
    "text", ["", "127.0.0.1:7000", "tcp://127.0.0.1", "127.0.0.300", "1.2.3.4.5", "-a", "a b"]
)
def test_other_texts_are_not(text):
    assert not is_host(text)


def test_loopback_addresses_are_this_machines_and_test_net_is_not():
    check_local_host("127.0.0.4")
    with pytest.raises(ValueError, match=rf"^{NOT_HERE} is not an address of this machine \("):
        check_local_host(NOT_HERE)


@pytest.mark.parametrize(
    ("host", "kind"), [("224.0.0.1", "a multicast"), ("255.255.255.255", "the broadcast")]
)
def test_a_multicast_or_the_broadcast_address_is_not_this_machines(host, kind):
    """Linux binds a TCP socket to them, but no connection ever reaches one."""
    with pytest.raises(ValueError, match=rf"^{host} is not an address of this machine \({kind} "):
        check_local_host(host)


def test_shard_hosts_go_round_the_shards():
    cluster = ClusterConfig(num_shards=3, shard_hosts=("127.0.0.2", "127.0.0.3"))
    assert [cluster.shard_host(i) for i in range(3)] == ["127.0.0.2", "127.0.0.3", "127.0.0.2"]
    assert ClusterConfig().shard_host(1) == "127.0.0.1"


@pytest.mark.parametrize(
    ("cluster", "field"),
    [
        (ClusterConfig(shard_hosts=("127.0.0.2", NOT_HERE)), "cluster.shard_hosts"),
        (ClusterConfig(worker_host=NOT_HERE), "cluster.worker_host"),
    ],
)
def test_a_host_not_here_is_refused_naming_its_field(cluster, field):
    with pytest.raises(ConfigFieldError) as refused:
        check_hosts_are_here(cluster)
    assert refused.value.field == field
    assert refused.value.problem.startswith(f"{NOT_HERE} is not an address of this machine")


def test_a_manual_worker_checks_only_its_own_host():
    check_hosts_are_here(ClusterConfig(shard_hosts=(NOT_HERE,)), shards=False)


def test_a_worker_host_of_another_address_family_than_a_shards_is_refused():
    # No connection leaves an IPv6 address for an IPv4 one: refused at once, not retried.
    with pytest.raises(
        ValueError, match=r"^connections cannot leave ::1 \(IPv6\) for 127\.0\.0\.2"
    ):
        check_reachable_from("127.0.0.2", "::1")
    check_reachable_from("127.0.0.2", "127.0.0.3")
    check_reachable_from("localhost", "127.0.0.3")  # a name with an IPv4 address reaches it
    with pytest.raises(ConfigFieldError) as refused:
        check_workers_reach("::1", ["127.0.0.1"])
    assert refused.value.field == "cluster.worker_host"
