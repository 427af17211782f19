"""Parameter groups on one shard process: each group (a model-parallel partition's
parameters) has its own layout, version and optimizer; a connection serves one group; STATS
sums the groups unless asked for one; every group's checkpoint is restored."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.errors import ModelMismatchError, RemoteError
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server.groups import ShardGroups
from distbelief.sharding import FlatLayout, TensorSpec
from distbelief.wire import Message, connect, ops, serve

FIRST = [TensorSpec("0.weight", (4, 3), torch.float32), TensorSpec("0.bias", (4,), torch.float32)]
SECOND = [TensorSpec("2.weight", (2, 4), torch.float32)]


def _shard(shard_id: int, num_shards: int) -> ParameterShard:
    return ParameterShard(shard_id, num_shards, server_optimizer_factory("sgd", lr=1.0))


@contextlib.contextmanager
def _served(num_shards: int, checkpoint_dir=None) -> Iterator[tuple[list[ShardGroups], list[str]]]:
    all_groups, servers = [], []
    try:
        for shard_id in range(num_shards):
            groups = ShardGroups(
                _shard(shard_id, num_shards),
                lambda shard_id=shard_id: _shard(shard_id, num_shards),
                checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir / str(shard_id),
                checkpoint_every_s=60.0,
            )
            groups.start_checkpoints(groups.restore(groups._checkpoint_dir))
            all_groups.append(groups)
            servers.append(serve("tcp://127.0.0.1:0", ShardService(groups.default, groups=groups)))
        yield all_groups, [server.address for server in servers]
    finally:
        for server in servers:
            server.stop()
        for groups in all_groups:
            groups.stop_checkpoints()


def _client(addresses, specs, group: str) -> ParameterServerClient:
    return ParameterServerClient(
        addresses, specs, timeout_s=60, retry_timeout_s=0, worker_id=f"w-{group}", group=group
    )


def _train_one_step(client: ParameterServerClient, specs, start: float) -> torch.Tensor:
    layout = FlatLayout(specs)
    total = layout.sizes[torch.float32]
    client.handshake({torch.float32: torch.arange(total, dtype=torch.float32) + start})
    client.push_now({torch.float32: torch.ones(total)})
    pulled = {torch.float32: torch.zeros(total)}
    client.pull_now(pulled)
    return pulled[torch.float32]


def test_two_groups_keep_their_own_layout_version_and_values():
    with _served(2) as (all_groups, addresses):
        first, second = _client(addresses, FIRST, "stage0"), _client(addresses, SECOND, "stage1")
        try:
            pulled_first = _train_one_step(first, FIRST, 0.0)
            pulled_second = _train_one_step(second, SECOND, 100.0)
            second.push_now({torch.float32: torch.ones(8)})
            stats_second = second.stats()
        finally:
            first.close()
            second.close()
        assert torch.equal(pulled_first, torch.arange(16, dtype=torch.float32) - 1.0)
        assert torch.equal(pulled_second, torch.arange(8, dtype=torch.float32) + 99.0)
        for groups in all_groups:
            shards = groups.shards()
            assert sorted(shards) == ["", "stage0", "stage1"]
            assert not shards[""].initialized
            assert (shards["stage0"].version, shards["stage1"].version) == (1, 2)
        assert [s["version"] for s in stats_second] == [2, 2]
        totals = _stats(addresses[0], {})
        assert (totals["version"], totals["num_pushes"]) == (3, 3)
        assert totals["groups"] == ["", "stage0", "stage1"]


def _stats(address: str, meta: dict) -> dict:
    transport = connect(address)
    try:
        return transport.request(Message(ops.STATS, meta), timeout_s=60).meta
    finally:
        transport.close()


def test_a_connection_serves_one_group_and_bad_names_are_refused():
    with _served(1) as (_, addresses):
        transport = connect(addresses[0])
        try:
            transport.request(Message(ops.STATS, {"group": "a"}), timeout_s=60)  # any group
            hello = {"group": "a", "shard_id": 0}
            transport.request(Message(ops.HELLO, hello), timeout_s=60)
            with pytest.raises(RemoteError, match="serves parameter group 'a', not 'b'"):
                transport.request(Message(ops.HELLO, {**hello, "group": "b"}), timeout_s=60)
        finally:
            transport.close()
        with pytest.raises(RemoteError, match="parameter group name 'a b'"):
            _stats(addresses[0], {"group": "a b"})


def test_a_pull_of_a_group_no_client_made_says_which_group_is_empty():
    """It said the shard held no parameters, its default group trained meanwhile."""
    with _served(1) as (_, addresses):
        worker = _client(addresses, FIRST, "")
        transport = connect(addresses[0])
        try:
            _train_one_step(worker, FIRST, 0.0)
            empty = "shard 0 holds no parameters of parameter group 'nope': no worker has"
            with pytest.raises(RemoteError, match=empty):
                transport.request(Message(ops.PULL, {"group": "nope"}), timeout_s=60)
        finally:
            transport.close()
            worker.close()


def test_a_whole_model_client_is_refused_by_a_partitioned_models_shards_at_once():
    # An evaluator (no initial values) of the whole model would otherwise wait its timeout
    # for an INIT that never comes, then blame the shards; a worker would train a model of
    # its own beside the job's partitions.
    whole = FIRST + SECOND
    with _served(2) as (_, addresses):
        stage = _client(addresses, FIRST, "stage0")
        evaluator = ParameterServerClient(addresses, whole, timeout_s=60, retry_timeout_s=0)
        worker = ParameterServerClient(addresses, whole, timeout_s=60, retry_timeout_s=0)
        try:
            _train_one_step(stage, FIRST, 0.0)
            started = time.monotonic()
            with pytest.raises(ModelMismatchError, match=r"partitioned model .*stage0.*--partit"):
                evaluator.handshake(None)
            assert time.monotonic() - started < 30  # not the client's 60 s timeout
            with pytest.raises(ModelMismatchError, match="partitioned model"):
                worker.handshake(FlatLayout(whole).allocate())
        finally:
            for client in (stage, evaluator, worker):
                client.close()


def test_a_partitions_client_is_refused_by_a_whole_models_shards():
    whole = FIRST + SECOND
    with _served(2) as (_, addresses):
        worker = ParameterServerClient(addresses, whole, timeout_s=60, retry_timeout_s=0)
        stage = _client(addresses, FIRST, "stage0")
        try:
            _train_one_step(worker, whole, 0.0)
            with pytest.raises(ModelMismatchError, match="whole model, not partition 'stage0'"):
                stage.handshake(None)
        finally:
            worker.close()
            stage.close()


def test_a_process_without_groups_refuses_a_named_one():
    shard = _shard(0, 1)
    server = serve("tcp://127.0.0.1:0", ShardService(shard))
    try:
        with pytest.raises(RemoteError, match="serves no parameter groups"):
            _stats(server.address, {"group": "stage0"})
    finally:
        server.stop()


def test_every_group_is_checkpointed_and_restored(tmp_path):
    with _served(1, tmp_path) as (_, addresses):
        first, second = _client(addresses, FIRST, "stage0"), _client(addresses, SECOND, "stage1")
        try:
            expected_first = _train_one_step(first, FIRST, 0.0)
            expected_second = _train_one_step(second, SECOND, 100.0)
        finally:
            first.close()
            second.close()
    assert (tmp_path / "0" / "group-stage0" / "shard0.json").exists()
    restored_groups = ShardGroups(_shard(0, 1), lambda: _shard(0, 1))
    assert restored_groups.restore(tmp_path / "0") == {"stage0": 1, "stage1": 1}
    shards = restored_groups.shards()
    assert torch.equal(shards["stage0"].store.get("param")[0], expected_first)
    assert torch.equal(shards["stage1"].store.get("param")[0], expected_second)


def test_groups_created_at_once_from_many_connections_are_one_each():
    groups = ShardGroups(_shard(0, 1), lambda: _shard(0, 1))
    got: list[ParameterShard] = []
    threads = [threading.Thread(target=lambda: got.append(groups.get("x"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len({id(shard) for shard in got}) == 1
