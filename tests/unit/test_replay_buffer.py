"""The replay buffer's math (``client/replay.py``) and the shard's side of it: checkpoint epochs,
replays applied once and worth their count (``server/durability.py``, ``server/shard.py``)."""

import pytest
import torch

from distbelief.client.replay import ShardReplay
from distbelief.config import ConsistencyConfig
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.sharding import TensorSpec

LIFE, NEXT_LIFE = "aaaa", "bbbb"


def _reply(epoch: int, saved: int, *, life: str = LIFE, restored: int = 0, **extra) -> dict:
    durable = {"life": life, "restored": restored, "saved": saved}
    if "void" in extra:
        durable["void"] = extra.pop("void")
    return {"version": extra.pop("version", 0), "epoch": epoch, "durable": durable, **extra}


def _push(buffer: ShardReplay, value: float, epoch: int, saved: int, **extra) -> None:
    meta = _reply(epoch, saved, **extra)
    assert buffer.observe(meta) is None
    buffer.record(meta, [torch.full((3,), value), torch.full((2,), -value)])


def test_sums_pushes_by_epoch_and_releases_those_on_disk():
    buffer = ShardReplay()
    _push(buffer, 1.0, epoch=0, saved=0)
    _push(buffer, 2.0, epoch=0, saved=0)
    _push(buffer, 4.0, epoch=1, saved=0)  # checkpoint 1 began, not saved yet
    assert {e: s.count for e, s in buffer.sums.items()} == {0: 2, 1: 1}
    assert torch.equal(buffer.sums[0].tensors[0], torch.full((3,), 3.0))
    _push(buffer, 8.0, epoch=1, saved=1)  # checkpoint 1 is on disk: epoch 0 is in it
    assert list(buffer.sums) == [1] and buffer.held == 2
    assert torch.equal(buffer.sums[1].tensors[1], torch.full((2,), -12.0))
    # A retried push answered again with the epoch it was applied in, now on disk: not held.
    buffer.record(_reply(0, 1), [torch.ones(3), torch.ones(2)])
    assert buffer.held == 2


def test_a_restart_hands_back_exactly_what_its_checkpoint_lacks_once():
    buffer = ShardReplay()
    _push(buffer, 1.0, epoch=2, saved=2, version=10)
    _push(buffer, 2.0, epoch=3, saved=2, version=11)  # checkpoint 3 began
    _push(buffer, 4.0, epoch=3, saved=2, version=12)
    # The shard restarted from checkpoint 3 (saved before it died, unknown to this client):
    # epoch 2 is in it, epoch 3 is not.
    replay = buffer.observe(_reply(3, 3, life=NEXT_LIFE, restored=3, version=11), in_flight=1)
    assert replay is not None
    assert (replay.count, replay.resent, replay.seen_version) == (2, 1, 12)
    assert torch.equal(replay.tensors[0], torch.full((3,), 6.0))
    assert torch.equal(replay.tensors[1], torch.full((2,), -6.0))
    assert buffer.sums == {} and buffer.life == NEXT_LIFE
    # The same life again: nothing more to re-send.
    assert buffer.observe(_reply(3, 3, life=NEXT_LIFE, restored=3)) is None


def test_a_restart_from_an_older_checkpoint_replays_every_epoch_since():
    buffer = ShardReplay()
    _push(buffer, 1.0, epoch=0, saved=0)
    _push(buffer, 2.0, epoch=1, saved=0)
    replay = buffer.observe(_reply(0, 0, life=NEXT_LIFE, restored=0))
    assert replay is not None and replay.count == 2
    assert torch.equal(replay.tensors[0], torch.full((3,), 3.0))


def test_a_failed_save_merges_the_epochs_around_it():
    buffer = ShardReplay()
    _push(buffer, 1.0, epoch=1, saved=1)
    _push(buffer, 2.0, epoch=2, saved=1)  # checkpoint 2 began ...
    _push(buffer, 4.0, epoch=2, saved=1, void=[2])  # ... and its save failed
    assert list(buffer.sums) == [2] and buffer.sums[2].count == 3
    _push(buffer, 8.0, epoch=3, saved=1)  # checkpoint 3 began
    _push(buffer, 16.0, epoch=3, saved=3)  # and is saved: every epoch before is on disk
    assert list(buffer.sums) == [3] and buffer.held == 2
    assert torch.equal(buffer.sums[3].tensors[0], torch.full((3,), 24.0))


def test_scaled_pushes_are_held_as_applied_and_half_precision_is_summed_in_float():
    buffer = ShardReplay()
    meta = _reply(0, 0, divisor=4)
    buffer.observe(meta)
    buffer.record(meta, [torch.full((3,), 2.0)])
    assert torch.equal(buffer.sums[0].tensors[0], torch.full((3,), 0.5))
    half = ShardReplay()
    meta = _reply(0, 0)
    half.observe(meta)
    for _ in range(3000):
        half.record(meta, [torch.full((1,), 1.0, dtype=torch.bfloat16)])
    assert half.sums[0].tensors[0].dtype == torch.float32
    assert half.sums[0].tensors[0].item() == 3000.0  # bfloat16 would stop at 256


def test_replies_without_checkpoint_numbers_keep_nothing():
    buffer = ShardReplay()
    assert buffer.observe({"version": 3}) is None
    buffer.record({"version": 3}, [torch.ones(2)])
    assert buffer.sums == {} and buffer.life is None


# ----------------------------------------------------------------------- the shard's side

SPECS = [TensorSpec("w", (5,), torch.float32)]


def _shard(optimizer: str = "sgd", **consistency) -> ParameterShard:
    shard = ParameterShard(
        0, 1, server_optimizer_factory(optimizer, lr=0.5), ConsistencyConfig(**consistency)
    )
    shard.initialize(SPECS, [torch.zeros(5)])
    shard.track_checkpoints()
    return shard


def _push_to(shard: ParameterShard, value: float, seq: int):
    return shard.push([torch.full((5,), value)], worker="w", seq=("s", seq))


def test_pushes_carry_the_epoch_of_the_checkpoints_begun_before_them():
    shard = _shard()
    assert _push_to(shard, 1.0, 1).epoch == 0
    state = shard.snapshot()
    assert state.values["checkpoint_number"] == 1
    second = _push_to(shard, 1.0, 2)
    assert (second.epoch, second.durable["saved"]) == (1, 0)
    shard.checkpoint_finished(state, saved=True)
    assert _push_to(shard, 1.0, 3).durable["saved"] == 1
    failed = shard.snapshot()
    shard.checkpoint_finished(failed, saved=False)
    assert _push_to(shard, 1.0, 4).durable["void"] == [2]
    shard.checkpoint_finished(shard.snapshot(), saved=True)
    # A retry of push 4 is answered with the epoch it was applied in, not applied again.
    again = _push_to(shard, 1.0, 4)
    assert (again.duplicate, again.epoch, shard.version) == (True, 2, 4)
    assert again.durable["saved"] == 3 and "void" not in again.durable


def test_a_replay_is_one_step_worth_its_count_applied_once():
    shard = _shard()
    _push_to(shard, 1.0, 1)
    state = shard.snapshot()
    restarted = _shard()
    restarted.restore(state)
    assert restarted.durability.describe()["restored"] == 1
    assert (restarted.version, restarted.last_push["w#s"][2]) == (1, 0)
    grads = [torch.full((5,), 6.0)]
    result = restarted.replay(grads, worker="w", seq=("r", 1), count=3, resent=1, seen_version=4)
    assert result.version == 4 and not result.duplicate
    assert torch.allclose(restarted.parameters()[0], torch.full((5,), -0.5 * 7.0))
    again = restarted.replay(
        [torch.full((5,), 6.0)], worker="w", seq=("r", 1), count=3, resent=1, seen_version=4
    )
    assert again.duplicate and restarted.version == 4
    assert restarted.recovery() == {
        "restored_checkpoint": 1,
        "updates_replayed": 3,
        "pushes_resent": 1,
        "version_seen_before": 4,
    }
    # A report without gradients changes no parameter.
    restarted.replay([], worker="w", seq=("r", 2), count=0, resent=1, seen_version=5)
    assert restarted.version == 4 and restarted.recovery()["pushes_resent"] == 2


def test_replays_are_refused_without_checkpoints_or_under_sync_rounds():
    untracked = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.5))
    untracked.initialize(SPECS, [torch.zeros(5)])
    assert untracked.push([torch.ones(5)]).durable is None
    with pytest.raises(ValueError, match="takes no replays"):
        untracked.replay([torch.ones(5)], worker="w", seq=("r", 1), count=1)
    sync = _shard(sync=True)
    with pytest.raises(ValueError, match="takes no replays of updates"):
        sync.replay([torch.ones(5)], worker="w", seq=("r", 1), count=1)
    assert sync.version == 0


def test_a_sync_shard_describes_its_life_and_takes_reports_of_the_version_seen():
    # A round's averaged update is no client's to replay, but the clients must tell a restart
    # (the life) and report the last version they saw of the life before.
    sync = _shard(sync=True)
    result = _push_to(sync, 1.0, 1)
    assert result.version == 1 and result.durable == sync.describe_durability()
    assert result.durable["life"] == sync.life
    sync.restore(sync.snapshot())
    sync.replay([], worker="w", seq=("r", 1), count=0, seen_version=7)
    sync.replay([], worker="v", seq=("r", 1), count=0, seen_version=5)
    assert sync.version == 1
    assert sync.recovery() == {
        "restored_checkpoint": 1,
        "updates_replayed": 0,
        "pushes_resent": 0,
        "version_seen_before": 7,
    }


def test_checkpoints_written_before_epochs_still_restore():
    shard = _shard()
    _push_to(shard, 1.0, 1)
    state = shard.snapshot()
    state.values["last_push"] = {"w#s": [1, 1]}
    del state.values["checkpoint_number"]
    restarted = _shard()
    restarted.restore(state)
    assert restarted.last_push["w#s"] == (1, 1, 0, 1)
    assert restarted.durability.describe()["restored"] == 0


@pytest.mark.parametrize(
    ("count", "said"),
    [
        (0, "it lacks none of this worker's pushes"),  # not "the sum of 0 pushes"
        (3, "re-sending the sum of 3 pushes it lacks"),
    ],
)
def test_a_restart_is_told_in_words_with_or_without_pushes_to_resend(count, said, caplog):
    from types import SimpleNamespace

    from distbelief.client.ps_client import ParameterServerClient
    from distbelief.client.replay import Replay

    client = SimpleNamespace(addresses=["tcp://127.0.0.1:7000"], consistency={})
    replay = Replay(tensors=None, count=count, resent=0, seen_version=5)
    with caplog.at_level("INFO", logger="distbelief.client.ps_client"):
        ParameterServerClient._log_restart(client, 0, replay)  # type: ignore[arg-type]
    [record] = caplog.records
    assert record.getMessage() == (
        f"shard 0 (tcp://127.0.0.1:7000) restarted from a checkpoint: {said}"
    )
