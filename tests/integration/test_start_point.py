"""Sandblaster's first checkpoint, the start point, against two real shard processes: a shard
restarted empty after the handshake gave the shards the model refuses the save, is given the
model again, and the save goes through, every shard's part of it the model's values."""

from __future__ import annotations

import torch
from torch import nn

from distbelief.client import ParameterServerClient, ShardVectors
from distbelief.config import FaultsConfig
from distbelief.coordinator import checkpoint
from distbelief.coordinator.lbfgs import LBFGSSettings
from distbelief.coordinator.run import commit_start_point
from distbelief.server.checkpoint import load_checkpoint
from distbelief.sharding import FlatLayout, tensor_specs
from tests.conftest import private_loopback, start_shard, stop_processes


def test_a_shard_restarted_empty_before_the_commit_is_given_the_model_again(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    specs = tensor_specs(model.named_parameters())
    initial = FlatLayout(specs).flatten(list(model.parameters()))
    # The coordinator's folder is shard 0's, as in a job, where all share RUN/checkpoints.
    folder = tmp_path / "checkpoints"
    first, address0 = start_shard(0, 2, "--checkpoint-dir", str(folder))
    # Restarted at its address: one no other process takes meanwhile.
    second, address1 = start_shard(
        1, 2, "--bind", f"tcp://{private_loopback()}:0", "--checkpoint-dir", str(tmp_path / "lost")
    )
    processes = [first, second]
    client = ParameterServerClient([address0, address1], specs, timeout_s=30, retry_timeout_s=60)
    try:
        assert client.handshake(initial)
        second.kill()
        second.wait(timeout=30)
        # Back on its address, with nothing saved: as a shard killed before any checkpoint.
        again, _ = start_shard(1, 2, "--bind", address1, "--checkpoint-dir", str(folder))
        processes.append(again)
        vectors = ShardVectors(client)
        commit_start_point(vectors, initial, LBFGSSettings(), str(folder), FaultsConfig())
        held = FlatLayout(specs).allocate()
        vectors.read("param", held)
    finally:
        client.close()
        stop_processes(processes)
    assert "a shard restarted before the first checkpoint: given the model again" in caplog.text
    assert torch.equal(held[torch.float32], initial[torch.float32])
    record = checkpoint.read_record(folder)
    assert record is not None and (record["tag"], record["iteration"]) == ("lbfgs-start", 0)
    assert record["state"]["grad"] == ""  # L-BFGS not yet started: its first evaluation next
    for shard_id in range(2):
        assert load_checkpoint(folder / "lbfgs-start", shard_id) is not None, shard_id
