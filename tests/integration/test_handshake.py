"""The handshake against real shards: another partitioner, shards with different consistency
settings or sync rounds of another number of workers are refused by name; an equal non-default
partitioner trains as its layout says; an INIT is checked as a HELLO is (the shard's place in
the client's list, the slices' names)."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.config import ConsistencyConfig
from distbelief.errors import ConsistencyMismatchError, LayoutMismatchError, RemoteError
from distbelief.server import ParameterShard
from distbelief.sharding import (
    FlatLayout,
    FlatPartitioner,
    ParameterGroupPartitioner,
    Partitioner,
    RowAlignedPartitioner,
    TensorSpec,
    specs_to_json,
)
from distbelief.wire import Message, connect, ops
from tests.conftest import served_shards, start_shard, stop_processes

SPECS = [TensorSpec("embed", (50, 8), torch.float32), TensorSpec("bias", (8,), torch.float32)]
NUM_ELEMENTS = 50 * 8 + 8


def _serve_shards(
    num_shards: int,
    partitioner: Partitioner,
    consistency: ConsistencyConfig | None = None,
    num_workers: int = 1,
) -> contextlib.AbstractContextManager[tuple[list[ParameterShard], list[str]]]:
    """Shards of ``partitioner`` served on free ports of 127.0.0.1 in this process."""
    return served_shards(
        num_shards,
        lr=1.0,
        consistency=consistency,
        partitioner=partitioner,
        num_workers=num_workers,
    )


def _refused_handshake(client: ParameterServerClient, error: type[Exception]) -> Exception:
    """The ``error`` that ``client``'s handshake raises (its connections closed after)."""
    try:
        with pytest.raises(error) as refused:
            client.handshake(FlatLayout(SPECS).allocate())
    finally:
        client.close()
    return refused.value


def test_a_shard_with_another_partitioner_refuses_the_client_naming_both():
    with _serve_shards(2, RowAlignedPartitioner()) as (shards, addresses):
        client = ParameterServerClient(addresses, SPECS, timeout_s=60, retry_timeout_s=0)
        refused = _refused_handshake(client, LayoutMismatchError)
        assert not any(shard.initialized for shard in shards)
    message = str(refused)
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
    assert refused.value.field == "consistency.max_staleness"
    message = str(refused.value)
    assert message.startswith("consistency.max_staleness differs: ")
    assert "runs 2 but" in message and "runs (not set)" in message
    assert f"shard 0 ({addresses[0]})" in message and f"shard 1 ({addresses[1]})" in message


@pytest.mark.parametrize("num_workers", [1, 3])
def test_sync_shards_of_another_number_of_workers_refuse_the_worker(num_workers):
    with _serve_shards(2, FlatPartitioner(), ConsistencyConfig(sync=True), num_workers=2) as (
        shards,
        addresses,
    ):
        client = ParameterServerClient(
            addresses, SPECS, timeout_s=60, retry_timeout_s=0, num_workers=num_workers
        )
        refused = _refused_handshake(client, ConsistencyMismatchError)
        assert not any(shard.initialized for shard in shards)
    assert isinstance(refused, ConsistencyMismatchError)
    assert refused.field == "cluster.num_workers"
    assert refused.problem.startswith(
        f"shard 0 ({addresses[0]}) runs sync rounds of 2 workers, but this worker is one of "
        f"{num_workers}: "
    )


@pytest.mark.parametrize("sync", [True, False])
def test_a_worker_of_the_shards_round_size_or_of_async_shards_is_let_in(sync):
    # Async shards take pushes from any number of workers: their --num-workers is not checked.
    consistency = ConsistencyConfig(sync=sync)
    with _serve_shards(1, FlatPartitioner(), consistency, num_workers=2) as (_, addresses):
        client = ParameterServerClient(
            addresses, SPECS, timeout_s=60, retry_timeout_s=0, num_workers=2 if sync else 3
        )
        try:
            assert client.handshake(FlatLayout(SPECS).allocate())
        finally:
            client.close()


def test_default_partitioners_on_both_sides_agree():
    with _serve_shards(2, FlatPartitioner()) as (_, addresses):
        client = ParameterServerClient(addresses, SPECS, timeout_s=60, retry_timeout_s=0)
        try:
            assert client.handshake(FlatLayout(SPECS).allocate())
            assert client.consistency["staleness_policy"] == "none"
        finally:
            client.close()


@pytest.mark.parametrize(
    ("meta", "names", "refusal"),
    [
        ({"shard_id": 1}, None, "this address serves shard 0 of 2, but it is listed as shard 1"),
        ({}, ["bias"], "initial slices are named bias; this shard's: "),
    ],
    ids=["another-place", "renamed"],
)
def test_an_init_the_shard_would_not_say_hello_to_is_refused(meta, names, refusal):
    with _serve_shards(2, FlatPartitioner()) as (shards, addresses):
        [piece] = FlatPartitioner().partition(SPECS, 2)[0]
        tensor = torch.zeros(piece.numel)
        init = Message(
            ops.INIT,
            {"shard_id": 0, "specs": specs_to_json(SPECS), **meta},
            [((names or [piece.name])[0], tensor)],
        )
        transport = connect(addresses[0])
        try:
            with pytest.raises(RemoteError, match=refusal):
                transport.request(init, timeout_s=60)
        finally:
            transport.close()
        assert not shards[0].initialized


def test_no_client_joins_a_shard_whose_first_checkpoint_is_still_being_written(monkeypatch):
    """Killed before its first checkpoint is on disk, a shard restarts empty: a client that had
    joined it meanwhile (its HELLO answered "initialized") found it so and failed the job. A
    HELLO now waits for the INIT's first checkpoint, and is answered once it is written."""
    from distbelief.server.groups import ShardGroups

    saving, release = threading.Event(), threading.Event()

    def slow_first_checkpoint(self, name):
        saving.set()
        assert release.wait(60)

    monkeypatch.setattr(ShardGroups, "save_first_checkpoint", slow_first_checkpoint)
    with _serve_shards(1, FlatPartitioner()) as (_shards, addresses):
        [piece] = FlatPartitioner().partition(SPECS, 1)[0]
        init = Message(
            ops.INIT,
            {"shard_id": 0, "specs": specs_to_json(SPECS)},
            [(piece.name, torch.zeros(piece.numel))],
        )
        hello = Message(ops.HELLO, {"shard_id": 0, "specs": specs_to_json(SPECS)})
        initialiser, joiner = connect(addresses[0]), connect(addresses[0])
        answers: dict[str, dict] = {}
        threads = [
            threading.Thread(
                target=lambda: answers.__setitem__(
                    "init", initialiser.request(init, timeout_s=60).meta
                )
            ),
            threading.Thread(
                target=lambda: answers.__setitem__(
                    "hello", joiner.request(hello, timeout_s=60).meta
                )
            ),
        ]
        try:
            threads[0].start()
            assert saving.wait(60)
            threads[1].start()
            threads[1].join(1.0)  # long enough for a HELLO that does not wait to be answered
            assert "hello" not in answers
            release.set()
            for thread in threads:
                thread.join(60)
        finally:
            release.set()
            initialiser.close()
            joiner.close()
    assert answers["init"]["adopted"] is True
    assert answers["hello"]["initialized"] is True
