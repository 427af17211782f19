"""Pulls of the changed elements only: the shard's change log, and a shard's answer against the
whole snapshot it replaces (the values a worker ends up with must be exactly the same)."""

from __future__ import annotations

import pytest
import torch

from distbelief.client.compression import HeldValues
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server.changes import ChangeLog, keeps_support
from distbelief.sharding import FlatPartitioner, TensorSpec
from distbelief.wire.compression import GENERATION_KEY, SINCE_KEY


def _indices(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_the_log_knows_nothing_before_a_pull_asks():
    log = ChangeLog()
    log.record(1, [_indices(2)])
    assert not log.active
    assert log.changed_since(1, 1, [10]) is None  # activates it
    assert log.active
    assert [t.tolist() for t in log.changed_since(1, 1, [10])] == [[]]


def test_sparse_updates_are_recorded_element_by_element():
    log = ChangeLog()
    log.changed_since(0, 3, [10, 4])
    log.record(4, [_indices(2, 7), _indices()])
    log.record(5, [_indices(7, 9), _indices(1)])
    assert [t.tolist() for t in log.changed_since(3, 5, [10, 4])] == [[2, 7, 9], [1]]
    assert [t.tolist() for t in log.changed_since(4, 5, [10, 4])] == [[7, 9], [1]]
    assert [t.tolist() for t in log.changed_since(5, 5, [10, 4])] == [[], []]


def test_a_dense_update_or_an_unrecorded_one_marks_everything_changed():
    log = ChangeLog()
    log.changed_since(0, 1, [10])
    log.record(2, [_indices(3)])
    log.record(3, None)  # dense
    assert log.changed_since(2, 3, [10]) is None
    assert [t.tolist() for t in log.changed_since(3, 3, [10])] == [[]]
    log.record(4, [_indices(1)])
    # Generation 5 changed the parameters without telling the log (a vector program, say).
    assert log.changed_since(4, 5, [10]) is None
    log.record(7, [_indices(8)])  # 6 was not told of either
    assert log.changed_since(5, 7, [10]) is None
    assert [t.tolist() for t in log.changed_since(6, 7, [10])] == [[8]]


def test_a_generation_the_shard_has_not_reached_is_unknown():
    log = ChangeLog()
    log.changed_since(0, 2, [4])
    assert log.changed_since(3, 2, [4]) is None


def test_which_optimizers_move_only_the_pushed_elements():
    params = [torch.zeros(3, requires_grad=True)]
    assert keeps_support(torch.optim.SGD(params, lr=0.1))
    assert keeps_support(torch.optim.Adagrad(params, lr=0.1))
    assert not keeps_support(torch.optim.SGD(params, lr=0.1, momentum=0.9))
    assert not keeps_support(torch.optim.SGD(params, lr=0.1, weight_decay=0.1))
    assert not keeps_support(torch.optim.Adam(params, lr=0.1))


def _shard(optimizer: str) -> ParameterShard:
    specs = [TensorSpec("w", (50,), torch.float32), TensorSpec("b", (30,), torch.float32)]
    shard = ParameterShard(0, 1, server_optimizer_factory(optimizer, lr=0.1))
    pieces = FlatPartitioner().partition(specs, 1)[0]
    torch.manual_seed(0)
    shard.initialize(specs, [torch.randn(piece.numel) for piece in pieces])
    return shard


def _sparse_grad(numel: int, indices: list[int]) -> torch.Tensor:
    grad = torch.zeros(numel)
    grad[indices] = torch.randn(len(indices))
    return grad


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_changes_applied_to_the_held_values_equal_the_whole_snapshot(optimizer):
    shard = _shard(optimizer)
    numel = shard.slices[0].numel
    held = [torch.empty(numel)]
    generation = shard.pull_into(held, changes_since=-1).generation
    for step in range(6):
        shard.push([_sparse_grad(numel, [step, 3 * step + 1, 79 - step])], sparse=True)
        if step % 2:
            continue  # two pushes between pulls
        result = shard.pull_into([torch.empty(numel)], changes_since=generation, max_changed=20)
        assert result.changes is not None
        ((indices, values),) = result.changes
        assert 0 < indices.numel() <= 6
        held[0][indices] = values
        whole = [torch.empty(numel)]
        shard.pull_into(whole)
        assert torch.equal(held[0], whole[0])
        generation = result.generation


def test_whole_snapshots_when_changes_are_many_or_unknown():
    shard = _shard("sgd")
    numel = shard.slices[0].numel
    generation = shard.pull_into([torch.empty(numel)], changes_since=0).generation
    shard.push([_sparse_grad(numel, list(range(30)))], sparse=True)
    outs = [torch.full((numel,), float("nan"))]
    many = shard.pull_into(outs, changes_since=generation, max_changed=20)
    assert many.changes is None and not outs[0].isnan().any()  # over the bound: whole
    # Momentum moves elements whose gradient is zero: one sparse push changes them all.
    momentum = _shard("momentum")
    generation = momentum.pull_into([torch.empty(numel)], changes_since=-1).generation
    unchanged = momentum.pull_into([torch.empty(numel)], changes_since=generation)
    assert [indices.numel() for indices, _ in unchanged.changes] == [0]  # nothing yet
    momentum.push([_sparse_grad(numel, [1])], sparse=True)
    changes = momentum.pull_into([torch.empty(numel)], changes_since=generation, max_changed=20)
    assert changes.changes is None


def test_a_worker_asks_for_changes_only_into_the_buffers_it_pulled_into():
    held = HeldValues(1)
    inbox = {"w": torch.zeros(4)}
    assert held.since(0, inbox) == {SINCE_KEY: None}
    held.pulled(0, inbox, {GENERATION_KEY: ["life", 3]})
    assert held.since(0, inbox) == {SINCE_KEY: ["life", 3]}
    # Until a pull completes, the buffers count as holding nothing (it may stop half-way).
    assert held.since(0, inbox) == {SINCE_KEY: None}
    held.pulled(0, inbox, {GENERATION_KEY: ["life", 4]})
    assert held.since(0, {"w": torch.zeros(4)}) == {SINCE_KEY: None}
