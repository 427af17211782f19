"""A shard serving many short client lives (each ``DownpourSGD`` a new worker id and session by
default) keeps a bounded number of them, the most recent, and still answers a retried push of
the most recent once."""

from __future__ import annotations

import torch

from distbelief.server import ParameterShard, server_optimizer_factory, sessions
from distbelief.sharding import FlatPartitioner, TensorSpec

SPECS = [TensorSpec("w", (4,), torch.float32)]


def _shard() -> ParameterShard:
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
    pieces = FlatPartitioner().partition(SPECS, 1)[0]
    shard.initialize(SPECS, [torch.zeros(piece.numel) for piece in pieces])
    return shard


SMALL_CAP = 64
"""The bound, lowered: the test goes past it in milliseconds, not past 16384 in seconds."""


def test_a_shard_keeps_the_most_recent_client_lives_not_every_one(monkeypatch):
    monkeypatch.setattr(sessions, "MAX_CLIENT_SESSIONS", SMALL_CAP)
    shard = _shard()
    lives = SMALL_CAP + 50
    for life in range(lives):
        worker = f"host:{life}"
        shard.arrive(worker)
        shard.push([torch.ones(4)], worker=worker, clock=1, seq=(f"session{life}", 1))
        shard.leave(worker)
    assert len(shard.last_push) <= SMALL_CAP
    assert len(shard.pushed_steps) <= SMALL_CAP
    assert len(shard.clocks.workers) <= SMALL_CAP
    assert len(shard.presence._closed_at_s) <= SMALL_CAP
    assert len(shard.snapshot().values["last_push"]) <= SMALL_CAP  # its checkpoints
    version = shard.version
    last = lives - 1
    retried = shard.push([torch.ones(4)], worker=f"host:{last}", clock=1, seq=(f"session{last}", 1))
    assert retried.duplicate and shard.version == version  # answered again, not applied twice
    assert shard.pushed_steps[f"host:{last}"] == 1
