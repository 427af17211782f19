"""Workers re-send what a restarted shard's checkpoint lacks: shards served in this process on
loopback, stopped without a last save (as a SIGKILL leaves them) and restarted from their
checkpoint files on the same address; two workers' pushes all end up applied exactly once."""

from __future__ import annotations

import torch

from distbelief.client import ParameterServerClient
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server.checkpoint import Checkpointer, load_checkpoint, save_checkpoint
from distbelief.sharding import TensorSpec
from distbelief.wire import serve

SPECS = [TensorSpec("w", (6, 4), torch.float32), TensorSpec("b", (6,), torch.float32)]
NUM_ELEMENTS = 30
LR = 0.5


class _ServedShard:
    """One shard with periodic-checkpoint bookkeeping (saves are made by the test), served."""

    def __init__(self, shard_id: int, directory, address: str = "tcp://127.0.0.1:0") -> None:
        self.shard = ParameterShard(shard_id, 2, server_optimizer_factory("sgd", lr=LR))
        state = load_checkpoint(directory, shard_id)
        if state is not None:
            self.shard.restore(state)
        self.shard.track_checkpoints()
        self.directory = directory
        self.checkpointer = Checkpointer(
            self.shard, directory, 3600.0, on_finished=self.shard.checkpoint_finished
        )
        self.server = serve(address, ShardService(self.shard))
        self.address = self.server.address

    def kill(self) -> None:
        """Stop serving with no last checkpoint, as SIGKILL would."""
        self.server.stop()


def _gradient(k: int) -> dict[torch.dtype, torch.Tensor]:
    return {torch.float32: torch.linspace(-1.0, 1.0, NUM_ELEMENTS) * (k + 1) + 0.1 * k}


def _client(addresses: list[str], worker: str) -> ParameterServerClient:
    return ParameterServerClient(
        addresses, SPECS, timeout_s=30, retry_timeout_s=30, worker_id=worker
    )


def test_a_restarted_shard_gets_every_push_of_two_workers_back_exactly_once(tmp_path):
    shards = [_ServedShard(i, tmp_path) for i in range(2)]
    addresses = [s.address for s in shards]
    first, second = _client(addresses, "w1"), _client(addresses, "w2")
    initial = {torch.float32: torch.linspace(0.0, 3.0, NUM_ELEMENTS)}
    pushed = []

    def push(client, k):
        client.push_now(_gradient(k))
        pushed.append(k)

    try:
        first.handshake(initial)
        second.handshake(initial)
        push(first, 0)
        push(second, 1)
        for shard in shards:
            shard.checkpointer.save_if_changed()  # checkpoint 1 (or 2): pushes 0 and 1
        push(first, 2)
        push(second, 3)
        # Checkpoint of shard 1 begins; a push lands after its snapshot, then the save ends
        # unannounced (the shard dies before any reply says so).
        state = shards[1].shard.snapshot()
        push(first, 4)
        save_checkpoint(state, tmp_path)
        push(second, 5)
        assert first.replays[1].held == 2 and second.replays[1].held == 2
        shards[1].kill()
        shards[1] = _ServedShard(1, tmp_path, address=addresses[1])
        restored = shards[1].shard.version
        assert restored == 4  # pushes 0-3; 4 and 5 were lost with the process
        push(first, 6)  # finds the restart: re-sends push 4 first
        pulled = {torch.float32: torch.zeros(NUM_ELEMENTS)}
        versions = second.pull_now(pulled)  # finds the restart: re-sends push 5, pulls again
        assert versions == [7, 7]
        assert first.replays[1].held == 2 and second.replays[1].held == 1
    finally:
        first.close()
        second.close()
        for shard in shards:
            shard.kill()
    expected = initial[torch.float32] - LR * sum(_gradient(k)[torch.float32] for k in pushed)
    torch.testing.assert_close(pulled[torch.float32], expected, rtol=0, atol=1e-6)
    assert shards[1].shard.recovery() == {
        "restored_checkpoint": state.values["checkpoint"],
        "updates_replayed": 2,
        "pushes_resent": 1,  # push 6 was in flight when the first worker found the restart
        "version_seen_before": 6,
    }
