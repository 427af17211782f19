"""A client used for a long time in a loop of one's own, which never takes its figures (as
``DownpourSGD`` in a user's script): what it keeps per request stays bounded."""

from __future__ import annotations

import torch

from distbelief.client import ParameterServerClient
from distbelief.client.lanes import RECENT_KEPT
from distbelief.sharding import FlatLayout, tensor_specs
from tests.conftest import served_shards

SPECS = tensor_specs([("w", torch.zeros(6)), ("b", torch.zeros(2))])


def test_pushes_never_taken_keep_only_the_most_recent_figures():
    pushes = RECENT_KEPT + 300
    with served_shards(1) as (_shards, addresses):
        client = ParameterServerClient(
            addresses, SPECS, timeout_s=30, worker_id="w", shared_memory=False
        )
        try:
            flats = FlatLayout(SPECS).allocate()
            client.handshake(flats)  # the first client's values initialise the shard
            for step in range(pushes):
                client.push_now(flats, clock=step)
            staleness = client.take_staleness()
            figures = client.take_wire_figures()
            assert len(staleness) == RECENT_KEPT
            assert figures["latency_p50_ms"] is not None
            # Taken: the next window starts empty.
            assert client.take_staleness() == []
            assert client.take_wire_figures()["latency_p50_ms"] is None
        finally:
            client.close()
