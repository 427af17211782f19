"""A shard serving many short client lives (each ``DownpourSGD`` a new worker id and session by
default) keeps a bounded number of them, the most recent, and still answers a retried push of
the most recent once."""

from __future__ import annotations

import torch

from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server.sessions import MAX_CLIENT_SESSIONS
from distbelief.sharding import FlatPartitioner, TensorSpec

SPECS = [TensorSpec("w", (4,), torch.float32)]


def _shard() -> ParameterShard:
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
    pieces = FlatPartitioner().partition(SPECS, 1)[0]
    shard.initialize(SPECS, [torch.zeros(piece.numel) for piece in pieces])
    return shard


def test_a_shard_keeps_the_most_recent_client_lives_not_every_one():
    shard = _shard()
    lives = MAX_CLIENT_SESSIONS + 50
    for life in range(lives):
        worker = f"host:{life}"
        shard.arrive(worker)
        shard.push([torch.ones(4)], worker=worker, clock=1, seq=(f"session{life}", 1))
        shard.leave(worker)
    assert len(shard.last_push) <= MAX_CLIENT_SESSIONS
    assert len(shard.pushed_steps) <= MAX_CLIENT_SESSIONS
    assert len(shard.clocks.workers) <= MAX_CLIENT_SESSIONS
    assert len(shard.presence._closed_at_s) <= MAX_CLIENT_SESSIONS
    assert len(shard.snapshot().values["last_push"]) <= MAX_CLIENT_SESSIONS  # its checkpoints
    version = shard.version
    last = lives - 1
    retried = shard.push([torch.ones(4)], worker=f"host:{last}", clock=1, seq=(f"session{last}", 1))
    assert retried.duplicate and shard.version == version  # answered again, not applied twice
    assert shard.pushed_steps[f"host:{last}"] == 1
