"""The handshake against real shards: another partitioner or shards with different consistency
settings are refused by name; an equal non-default partitioner trains as its layout says."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.errors import ConsistencyMismatchError, LayoutMismatchError
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.sharding import (
    FlatLayout,
    FlatPartitioner,
    ParameterGroupPartitioner,
    Partitioner,
    RowAlignedPartitioner,
    TensorSpec,
)
from distbelief.wire import serve
from tests.conftest import start_shard, stop_processes

SPECS = [TensorSpec("embed", (50, 8), torch.float32), TensorSpec("bias", (8,), torch.float32)]
NUM_ELEMENTS = 50 * 8 + 8


@contextlib.contextmanager
def _serve_shards(
    num_shards: int, partitioner: Partitioner
) -> Iterator[tuple[list[ParameterShard], list[str]]]:
    """Shards of ``partitioner`` served on free ports of 127.0.0.1 in this process."""
    shards = [
        ParameterShard(
            i, num_shards, server_optimizer_factory("sgd", lr=1.0), partitioner=partitioner
        )
        for i in range(num_shards)
    ]
    servers = []
    try:
        for shard in shards:
            servers.append(serve("tcp://127.0.0.1:0", ShardService(shard)))
        yield shards, [server.address for server in servers]
    finally:
        for server in servers:
            server.stop()


def test_a_shard_with_another_partitioner_refuses_the_client_naming_both():
    with _serve_shards(2, RowAlignedPartitioner()) as (shards, addresses):
        client = ParameterServerClient(addresses, SPECS, timeout_s=60, retry_timeout_s=0)
        try:
            with pytest.raises(LayoutMismatchError) as refused:
                client.handshake(FlatLayout(SPECS).allocate())
        finally:
            client.close()
        assert not any(shard.initialized for shard in shards)
    message = str(refused.value)
    assert '{"kind":"row-aligned"}' in message and '{"kind":"flat"}' in message


def test_equal_parameter_group_partitioners_train_only_the_group_in_whole_rows():
    partitioner = ParameterGroupPartitioner(RowAlignedPartitioner(), ["embed"])
    layout = FlatLayout(SPECS)
    with _serve_shards(3, partitioner) as (shards, addresses):
        client = ParameterServerClient(
            addresses, SPECS, timeout_s=60, retry_timeout_s=0, partitioner=partitioner
        )
        try:
            initial = {torch.float32: torch.arange(NUM_ELEMENTS, dtype=torch.float32)}
            assert client.handshake(initial)
            client.push_now({torch.float32: torch.ones(NUM_ELEMENTS)})
            pulled = {torch.float32: torch.full((NUM_ELEMENTS,), -7.0)}
            client.pull_now(pulled)
        finally:
            client.close()
        assert all(
            piece.start % 8 == 0 and piece.stop % 8 == 0 for s in shards for piece in s.slices
        )
    embed, bias = layout.views(pulled)
    torch.testing.assert_close(embed.flatten(), torch.arange(400, dtype=torch.float32) - 1.0)
    assert bool((bias == -7.0).all())  # no shard owns it: a pull leaves it alone


def test_shards_started_with_different_consistency_flags_are_refused():
    shards = [
        start_shard(0, 2, "--max-staleness", "2"),
        start_shard(1, 2),
    ]
    try:
        addresses = [address for _, address in shards]
        client = ParameterServerClient(addresses, SPECS, timeout_s=60, retry_timeout_s=0)
        try:
            with pytest.raises(ConsistencyMismatchError) as refused:
                client.handshake(FlatLayout(SPECS).allocate())
            assert [stats["initialized"] for stats in client.stats()] == [False, False]
        finally:
            client.close()
    finally:
        stop_processes([process for process, _ in shards])
    message = str(refused.value)
    assert "max_staleness=2" in message and "max_staleness=None" in message
    assert f"shard 0 ({addresses[0]})" in message and f"shard 1 ({addresses[1]})" in message


def test_default_partitioners_on_both_sides_agree():
    with _serve_shards(2, FlatPartitioner()) as (_, addresses):
        client = ParameterServerClient(addresses, SPECS, timeout_s=60, retry_timeout_s=0)
        try:
            assert client.handshake(FlatLayout(SPECS).allocate())
            assert client.consistency["staleness_policy"] == "none"
        finally:
            client.close()
