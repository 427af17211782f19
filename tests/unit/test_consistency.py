"""Shard-side consistency: server optimizers, staleness policies, SSP clocks, sync rounds."""

import dataclasses

import pytest
import torch

from distbelief.server import ConsistencyConfig, ParameterShard, server_optimizer_factory
from distbelief.server.consistency import (
    AsyncPolicy,
    BoundedStalenessPolicy,
    SyncRoundsPolicy,
    WorkerClocks,
    consistency_policy,
)
from distbelief.server.staleness import adjust_gradient
from distbelief.sharding import FlatLayout, FlatPartitioner, TensorSpec

SPECS = [TensorSpec("w", (13, 7), torch.float32), TensorSpec("b", (7,), torch.float32)]
TORCH_OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, eps=1e-10),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.9, 0.999), eps=1e-8),
}


def _make_shards(num_shards, values, factory, consistency=None, num_workers=1):
    flats = FlatLayout(SPECS).flatten(values)
    shards = []
    for shard_id, pieces in enumerate(FlatPartitioner().partition(SPECS, num_shards)):
        shard = ParameterShard(shard_id, num_shards, factory, consistency, num_workers=num_workers)
        shard.initialize(SPECS, [flats[p.dtype][p.start : p.stop] for p in pieces])
        shards.append(shard)
    return shards


def _slices(shard, flat):
    return [flat[p.dtype][p.start : p.stop].clone() for p in shard.slices]


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
def test_server_optimizer_matches_torch_on_unsharded_tensors(name, num_shards):
    torch.manual_seed(0)
    values = [torch.randn(spec.shape) for spec in SPECS]
    reference = [v.clone().requires_grad_() for v in values]
    torch_optimizer = TORCH_OPTIMIZERS[name](reference)
    shards = _make_shards(num_shards, values, server_optimizer_factory(name, lr=0.05))
    layout = FlatLayout(SPECS)
    for _ in range(8):
        grads = [torch.randn(spec.shape) for spec in SPECS]
        for param, grad in zip(reference, grads, strict=True):
            param.grad = grad.clone()
        torch_optimizer.step()
        flat = layout.flatten(grads)
        for shard in shards:
            shard.apply_gradient(_slices(shard, flat))
    got = layout.allocate()
    for shard in shards:
        for piece, value in zip(shard.slices, shard.parameters(), strict=True):
            got[piece.dtype][piece.start : piece.stop] = value
    for mine, want in zip(layout.views(got), reference, strict=True):
        torch.testing.assert_close(mine, want.detach(), atol=1e-6, rtol=0)


def test_scale_divides_by_staleness_and_dc_asgd_compensates():
    grad = torch.tensor([1.0, -2.0, 0.5])
    scaled = adjust_gradient(
        "scale", [grad.clone()], staleness=4, params_now=[grad], params_fetched=None, dc_lambda=0.1
    )
    torch.testing.assert_close(scaled[0], grad / 4)
    now, fetched = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 2.0, 1.0])
    compensated = adjust_gradient(
        "dc-asgd",
        [grad.clone()],
        staleness=3,
        params_now=[now],
        params_fetched=[fetched],
        dc_lambda=0.1,
    )
    torch.testing.assert_close(compensated[0], grad + 0.1 * grad * grad * (now - fetched))
    untouched = adjust_gradient(
        "none",
        [grad.clone()],
        staleness=9,
        params_now=[now],
        params_fetched=[fetched],
        dc_lambda=0.1,
    )
    torch.testing.assert_close(untouched[0], grad)


def test_shard_measures_staleness_and_applies_scale_policy():
    config = ConsistencyConfig(staleness_policy="scale")
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    shard = _make_shards(1, zeros, server_optimizer_factory("sgd", lr=1.0), config)[0]
    ones = [torch.ones(p.numel) for p in shard.slices]
    for _ in range(3):
        shard.push([g.clone() for g in ones], worker="a", base_version=shard.version)
    result = shard.push([g.clone() for g in ones], worker="b", base_version=0)
    assert (result.staleness, result.version) == (3, 4)
    assert shard.staleness.as_dict() == {"0": 3, "3": 1}
    assert torch.allclose(shard.parameters()[0], torch.full((98,), -(3 + 1 / 3)))


def test_clocks_hold_the_fastest_until_the_slowest_catches_up():
    clocks = WorkerClocks(liveness_timeout_s=10)
    clocks.touch("fast", 0, now_s=0)
    clocks.touch("slow", 0, now_s=0)
    clocks.touch("fast", 6, now_s=0)
    clocks.touch("slow", 3, now_s=0)
    assert clocks.too_far_ahead("fast", max_staleness=2, now_s=0)
    clocks.touch("slow", 4, now_s=1)
    assert not clocks.too_far_ahead("fast", max_staleness=2, now_s=1)


def test_dead_or_departed_workers_stop_holding_others():
    clocks = WorkerClocks(liveness_timeout_s=5)
    clocks.touch("fast", 0, now_s=0)
    clocks.touch("slow", 0, now_s=0)
    clocks.touch("fast", 10, now_s=0)
    assert clocks.slowest_clock(now_s=1) == 0
    clocks.touch("fast", 11, now_s=6)  # slow silent for 6 s > 5 s: no longer counted
    assert clocks.slowest_clock(now_s=6) == 11
    clocks.touch("other", 0, now_s=6)
    clocks.depart("other")
    assert clocks.slowest_clock(now_s=6) == 11


def test_late_joiner_starts_level_with_the_slowest():
    clocks = WorkerClocks(liveness_timeout_s=10)
    for worker, clock in (("a", 0), ("b", 0), ("a", 50), ("b", 40)):
        clocks.touch(worker, clock, now_s=0)
    clocks.touch("late", 0, now_s=1)
    assert clocks.effective_clock("late") == 40
    assert not clocks.too_far_ahead("a", max_staleness=10, now_s=1)


def test_a_worker_back_from_silence_rejoins_level_with_the_slowest():
    # Counted dead after 5 s of silence, the others went on; heard from again, it must not
    # hold them back until it has redone every step it missed.
    clocks = WorkerClocks(liveness_timeout_s=5)
    clocks.touch("a", 0, now_s=0)
    clocks.touch("b", 0, now_s=0)
    clocks.touch("b", 3, now_s=0)
    clocks.touch("a", 100, now_s=20)
    clocks.touch("b", 4, now_s=20)
    assert clocks.effective_clock("b") == 100
    assert not clocks.too_far_ahead("a", max_staleness=2, now_s=20)
    clocks.touch("a", 110, now_s=21)
    assert clocks.too_far_ahead("a", max_staleness=2, now_s=21)  # held again by b from here


def test_ssp_pull_is_held_then_released():
    config = ConsistencyConfig(max_staleness=1)
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    shard = _make_shards(1, zeros, server_optimizer_factory("sgd", lr=1.0), config)[0]
    outs = [torch.empty(p.numel) for p in shard.slices]
    shard.arrive("slow")
    shard.touch("slow", 0)
    shard.touch("fast", 0)
    assert shard.pull_into(outs, worker="fast", clock=3, max_wait_s=0.05).held
    shard.touch("slow", 2)
    assert not shard.pull_into(outs, worker="fast", clock=3, max_wait_s=0.05).held
    shard.touch("slow", 2)
    assert shard.pull_into(outs, worker="fast", clock=9, max_wait_s=0.05).held
    shard.leave("slow")
    assert not shard.pull_into(outs, worker="fast", clock=9, max_wait_s=0.05).held


def test_a_worker_leaves_only_when_its_last_connection_closes():
    """A reconnecting worker's old connection, seen closed after the new one opened, does not
    make it a departed worker (which would free the others to run ahead of it)."""
    config = ConsistencyConfig(max_staleness=1)
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    shard = _make_shards(1, zeros, server_optimizer_factory("sgd", lr=1.0), config)[0]
    outs = [torch.empty(p.numel) for p in shard.slices]
    shard.arrive("slow")
    shard.arrive("slow")  # its new connection
    shard.touch("slow", 2)
    shard.touch("fast", 2)
    shard.leave("slow")  # the old one
    assert shard.pull_into(outs, worker="fast", clock=9, max_wait_s=0.05).held
    assert shard.clocks.effective_clock("slow") == 2
    shard.leave("slow")
    assert not shard.pull_into(outs, worker="fast", clock=9, max_wait_s=0.05).held


def test_sync_round_applies_mean_of_first_n_minus_b_and_drops_late():
    config = ConsistencyConfig(sync=True, backup_workers=1)
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    shard = _make_shards(1, zeros, server_optimizer_factory("sgd", lr=1.0), config, 3)[0]
    outs = [torch.empty(p.numel) for p in shard.slices]
    first = shard.push(
        [torch.full((p.numel,), 1.0) for p in shard.slices], worker="a", base_version=0
    )
    assert (first.applied, first.version) == (True, 0)
    assert shard.pull_into(outs, worker="a", after_version=0, max_wait_s=0.05).held
    second = shard.push(
        [torch.full((p.numel,), 3.0) for p in shard.slices], worker="b", base_version=0
    )
    assert second.version == 1
    assert torch.allclose(shard.parameters()[0], torch.full((98,), -2.0))  # mean of 1 and 3
    late = shard.push(
        [torch.full((p.numel,), 100.0) for p in shard.slices], worker="c", base_version=0
    )
    assert not late.applied and shard.counters().num_dropped == 1
    assert not shard.pull_into(outs, worker="a", after_version=0, max_wait_s=0.05).held


def _sync_shard_of_two_workers():
    """A shard running sync rounds of 2 workers, a pull buffer, and a gradient of ones."""
    config = ConsistencyConfig(sync=True)
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    shard = _make_shards(1, zeros, server_optimizer_factory("sgd", lr=1.0), config, 2)[0]
    outs = [torch.empty(p.numel) for p in shard.slices]
    return shard, outs, [torch.ones(p.numel) for p in shard.slices]


def test_a_pull_after_a_push_dropped_as_late_is_not_held():
    """Its gradient is in no round: holding the pull would hold back the worker's next push."""
    shard, outs, ones = _sync_shard_of_two_workers()
    assert shard.push(ones, worker="a", base_version=0).applied
    assert shard.push(ones, worker="b", base_version=0).applied
    assert shard.version == 1
    assert not shard.push(ones, worker="b", base_version=0).applied  # computed from version 0
    assert not shard.pull_into(outs, worker="b", after_version=1, max_wait_s=0.05).held


def test_sync_rounds_go_on_after_a_shard_is_restored_from_an_older_checkpoint():
    """Workers pulled version 40 before the shard died; it came back at 0 (its checkpoint's):
    their next gradients make its next round, and their pulls wait for that round only."""
    shard, outs, ones = _sync_shard_of_two_workers()
    assert shard.push(ones, worker="a", base_version=40).applied
    assert shard.pull_into(outs, worker="a", after_version=40, max_wait_s=0.05).held
    assert shard.push(ones, worker="b", base_version=40).applied
    assert shard.version == 1
    for worker in ("a", "b"):
        assert not shard.pull_into(outs, worker=worker, after_version=40, max_wait_s=0.05).held


def test_a_pull_from_an_earlier_life_of_the_shard_is_not_held_before_the_worker_pushes():
    """Worker b's last push was lost with the shard's old life: its pull for a round of that
    life is answered, so its next push can complete the round worker a waits for."""
    shard, outs, ones = _sync_shard_of_two_workers()
    assert shard.push(ones, worker="a", base_version=40).applied
    assert not shard.pull_into(outs, worker="b", after_version=40, max_wait_s=0.05).held
    assert shard.pull_into(outs, worker="a", after_version=40, max_wait_s=0.05).held
    assert shard.push(ones, worker="b", base_version=0).applied
    assert shard.version == 1
    assert not shard.pull_into(outs, worker="a", after_version=40, max_wait_s=0.05).held


def test_sync_round_quorum_shrinks_when_a_worker_departs():
    config = ConsistencyConfig(sync=True)
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    shard = _make_shards(1, zeros, server_optimizer_factory("sgd", lr=1.0), config, 2)[0]
    outs = [torch.empty(p.numel) for p in shard.slices]
    shard.arrive("b")
    shard.touch("b", 0)
    shard.push([torch.ones(p.numel) for p in shard.slices], worker="a", base_version=0)
    assert shard.pull_into(outs, worker="a", after_version=0, max_wait_s=0.05).held
    shard.leave("b")
    assert not shard.pull_into(outs, worker="a", after_version=0, max_wait_s=0.05).held
    assert shard.version == 1


def test_a_worker_replaced_under_a_new_id_is_waited_for_as_the_one_it_replaced():
    """Worker b left and a new id took its place (a script's replica started again, under a new
    default worker id): once it has pushed, a round waits for it and a (every round closed on
    either alone, counting b as dead and the new id as one worker more). A client that only
    pulls is no worker of the rounds: a's rounds do not wait for it."""
    shard, outs, ones = _sync_shard_of_two_workers()
    for worker in ("a", "b"):
        shard.arrive(worker)
        assert shard.push(ones, worker=worker, base_version=0).applied
    shard.leave("b")
    for worker in ("b2", "reader"):
        shard.arrive(worker)
        assert not shard.pull_into(outs, worker=worker, clock=0, max_wait_s=0.05).held
    # Before b2's first push: a alone (b2 may never push, as the reader does not).
    assert shard.push(ones, worker="a", base_version=1).applied
    assert shard.version == 2
    assert shard.push(ones, worker="b2", base_version=2).applied
    assert shard.version == 2  # waits for a now
    assert shard.pull_into(outs, worker="b2", after_version=2, max_wait_s=0.05).held
    assert shard.push([3.0 * one for one in ones], worker="a", base_version=2).applied
    assert shard.version == 3
    # -1 (mean of two ones), -1 (a alone), -2 (mean of 1 and 3).
    assert torch.allclose(shard.parameters()[0], torch.full((98,), -4.0))


@pytest.mark.parametrize(("num_workers", "backup_workers"), [(2, 0), (3, 1)])
def test_a_restarted_worker_adds_no_second_gradient_to_a_round(num_workers, backup_workers):
    """Worker a's gradient joined round 0, then a died (its connection closed) and came back
    under the same id: its push for round 0 again is dropped, the round neither closes on it
    (counting a twice toward its quorum) nor waits for it, and averages a's first gradient
    with b's."""
    config = ConsistencyConfig(sync=True, backup_workers=backup_workers)
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    factory = server_optimizer_factory("sgd", lr=1.0)
    shard = _make_shards(1, zeros, factory, config, num_workers)[0]
    outs = [torch.empty(p.numel) for p in shard.slices]

    def full(value):
        return [torch.full((p.numel,), value) for p in shard.slices]

    shard.arrive("a")
    assert shard.push(full(1.0), worker="a", base_version=0).applied
    shard.leave("a")  # the dead life's connection closes
    shard.arrive("a")  # the restarted worker, under the same id
    again = shard.push(full(5.0), worker="a", base_version=0)
    assert not again.applied and shard.counters().num_dropped == 1
    assert shard.version == 0
    assert shard.pull_into(outs, worker="a", after_version=0, max_wait_s=0.05).held
    assert shard.push(full(3.0), worker="b", base_version=0).applied
    assert shard.version == 1
    assert torch.allclose(shard.parameters()[0], torch.full((98,), -2.0))  # mean of 1 and 3
    assert not shard.pull_into(outs, worker="a", after_version=0, max_wait_s=0.05).held
    assert shard.push(full(1.0), worker="a", base_version=1).applied  # the next round takes it


@pytest.mark.parametrize(
    ("kwargs", "policy_type"),
    [
        ({}, AsyncPolicy),
        ({"staleness_policy": "dc-asgd"}, AsyncPolicy),
        ({"max_staleness": 2, "staleness_policy": "scale"}, BoundedStalenessPolicy),
        ({"sync": True, "backup_workers": 1}, SyncRoundsPolicy),
    ],
)
def test_policy_is_built_from_the_config_and_describes_all_of_it(kwargs, policy_type):
    config = ConsistencyConfig(**kwargs)
    policy = consistency_policy(config, WorkerClocks(config.liveness_timeout_s), num_workers=3)
    assert type(policy) is policy_type
    assert policy.describe() == {
        "sync": config.sync,
        "num_workers": 3,
        "backup_workers": config.backup_workers,
        "max_staleness": config.max_staleness,
        "staleness_policy": config.staleness_policy,
        "dc_lambda": config.dc_lambda,
        "liveness_timeout_s": config.liveness_timeout_s,
        "apply_worker_lr": config.apply_worker_lr,
    }


def test_dc_asgd_compensates_with_the_parameters_each_worker_fetched():
    config = ConsistencyConfig(staleness_policy="dc-asgd", dc_lambda=0.5)
    torch.manual_seed(0)
    values = [torch.randn(spec.shape) for spec in SPECS]
    shard = _make_shards(1, values, server_optimizer_factory("sgd", lr=1.0), config)[0]
    outs = [torch.empty(p.numel) for p in shard.slices]
    shard.pull_into(outs, worker="a")
    fetched_a = shard.parameters()
    shard.apply_gradient([torch.full((p.numel,), 0.1) for p in shard.slices])
    shard.pull_into(outs, worker="b")
    shard.pull_into([torch.empty(p.numel) for p in shard.slices])  # anonymous: nothing kept
    assert sorted(shard.store.names()) == ["dc-asgd.fetched.a", "dc-asgd.fetched.b", "param"]
    now = shard.parameters()
    grads = [torch.randn(p.numel) for p in shard.slices]
    expected = [
        w - (g + 0.5 * g * g * (w - f)) for w, g, f in zip(now, grads, fetched_a, strict=True)
    ]
    shard.push([g.clone() for g in grads], worker="a")
    for got, want in zip(shard.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dc_asgd_forgets_the_copy_of_a_departed_worker_once_a_new_one_pulls():
    """Each script run under a new default worker id cost the shard a whole slice for good.
    A worker whose request failed closes its connection before it dials again: its retried
    push is still compensated, as long as no new worker came meanwhile."""
    config = ConsistencyConfig(staleness_policy="dc-asgd", dc_lambda=0.5)
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    shard = _make_shards(1, zeros, server_optimizer_factory("sgd", lr=1.0), config)[0]
    outs = [torch.empty(p.numel) for p in shard.slices]
    for worker in ("a", "b"):
        shard.arrive(worker)
        shard.pull_into(outs, worker=worker)
    shard.leave("a")  # a's request failed: it closed its connection, and dials again
    shard.leave("b")  # b's script ended
    assert sorted(shard.store.names()) == ["dc-asgd.fetched.a", "dc-asgd.fetched.b", "param"]
    shard.arrive("a")
    shard.push([torch.full((p.numel,), 0.1) for p in shard.slices], worker="a")  # the retry
    shard.arrive("c")
    shard.pull_into(outs, worker="c")  # a new script's first pull: b's copy goes, a's stays
    assert sorted(shard.store.names()) == ["dc-asgd.fetched.a", "dc-asgd.fetched.c", "param"]


@pytest.mark.parametrize("staleness_policy", ["none", "scale"])
def test_other_policies_keep_no_copy_per_worker(staleness_policy):
    config = ConsistencyConfig(staleness_policy=staleness_policy)
    zeros = [torch.zeros(spec.shape) for spec in SPECS]
    shard = _make_shards(1, zeros, server_optimizer_factory("sgd", lr=1.0), config)[0]
    shard.pull_into([torch.empty(p.numel) for p in shard.slices], worker="a")
    assert shard.store.names() == ["param"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backup_workers": -1}, "backup_workers"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"max_staleness": 2**64}, r"max_staleness must be an integer in \[0, 2147483647\]"),
        ({"max_staleness": 1.5}, "max_staleness"),
        ({"max_staleness": True}, "max_staleness"),
        ({"sync": True, "backup_workers": 1.5}, "backup_workers"),
        ({"sync": "yes"}, "sync must be True or False"),
        ({"staleness_policy": "magic"}, "staleness_policy"),
        ({"sync": True, "max_staleness": 2}, "sync rounds"),
    ],
)
def test_bad_consistency_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyConfig(**kwargs)


def test_shard_refuses_as_many_backup_workers_as_workers():
    factory = server_optimizer_factory("sgd", lr=0.1)
    with pytest.raises(ValueError, match=r"backup_workers must be < num_workers \(2\), got 2"):
        ParameterShard(0, 1, factory, ConsistencyConfig(sync=True, backup_workers=2), num_workers=2)


def test_bad_server_hyperparameters_name_the_field():
    with pytest.raises(ValueError, match="momentum"):
        server_optimizer_factory("momentum", lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="betas"):
        server_optimizer_factory("adam", lr=0.1, betas=(0.9, 1.0))


def test_shards_of_sync_and_async_rounds_are_refused_naming_sync_not_the_round_size():
    """An async shard's round size (1 by default) differs from a sync one's too: the refusal
    named --num-workers, the setting compared first, and hid the one that differs."""
    from types import SimpleNamespace

    from distbelief.client.handshake import ShardHandshake
    from distbelief.errors import ConsistencyMismatchError

    client = SimpleNamespace(addresses=["tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"])
    settings = dataclasses.asdict(ConsistencyConfig())
    described = [{**settings, "sync": True, "num_workers": 2}, {**settings, "num_workers": 1}]
    with pytest.raises(ConsistencyMismatchError) as refused:
        ShardHandshake._agreed_consistency(client, described)
    assert refused.value.field == "consistency.sync"
    assert (
        "runs sync rounds (--sync) but shard 1 (tcp://127.0.0.1:7001) runs asynchronously "
        "(no --sync)"
    ) in str(refused.value)
