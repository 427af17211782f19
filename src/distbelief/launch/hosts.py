"""The addresses a job's config gives for processes that run on this machine, checked before
any process starts: a shard that cannot bind its host, or a worker that cannot leave from its
own, would otherwise fail later and less clearly (a worker only after its retry timeout)."""

from __future__ import annotations

from collections.abc import Iterable

from distbelief.config import ClusterConfig
from distbelief.errors import ConfigFieldError
from distbelief.hosts import check_local_host, check_reachable_from


def check_hosts_are_here(cluster: ClusterConfig, *, shards: bool = True) -> None:
    """Check that the worker host and (``shards``) every shard host are this machine's.

    Raises:
        ConfigFieldError: one is not (``field`` names the config field that holds it).
    """
    named = [("cluster.worker_host", cluster.worker_host)]
    if shards:
        named += [("cluster.shard_hosts", host) for host in cluster.shard_hosts]
    for field, host in named:
        if not host:
            continue
        try:
            check_local_host(host)
        except ValueError as e:
            raise ConfigFieldError(field, str(e)) from None
    if shards:
        shard_hosts = {cluster.shard_host(i) for i in range(cluster.num_shards)}
        check_workers_reach(cluster.worker_host, sorted(shard_hosts))


def check_workers_reach(worker_host: str, shard_hosts: Iterable[str]) -> None:
    """Check that connections leaving ``worker_host`` (if set) can reach every shard host.

    Raises:
        ConfigFieldError: they cannot (the address families differ), naming the worker host's
            field.
    """
    if not worker_host:
        return
    for host in shard_hosts:
        try:
            check_reachable_from(host, worker_host)
        except ValueError as e:
            raise ConfigFieldError("cluster.worker_host", str(e)) from None
