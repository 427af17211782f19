"""The row table: pulls, admission, LRU and time-to-live eviction, growth, checkpoints."""

from __future__ import annotations

import re

import pytest
import torch

from distbelief.server.row_optimizers import LazyAdam, RowAdagrad, RowSGD, RowWiseAdagrad
from distbelief.server.row_table import RowTable

DIM = 4


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _push(table: RowTable, *values: int, grad: float = 1.0) -> None:
    table.push(_ids(*values), torch.full((len(values), DIM), grad))


def _held(table: RowTable) -> set[int]:
    return set(table.state_dict()["ids"].tolist())


def test_unknown_ids_read_as_zeros():
    table = RowTable(DIM, RowSGD(0.1))
    _push(table, 7)
    rows = table.pull(_ids(3, 7, -1))
    assert torch.equal(rows[0], torch.zeros(DIM))
    assert torch.allclose(rows[1], torch.full((DIM,), -0.1))
    assert torch.equal(rows[2], torch.zeros(DIM))


def test_admission_after_k_pushes_and_pulls_do_not_count():
    table = RowTable(DIM, RowSGD(1.0), admit_after=3)
    for _ in range(5):
        table.pull(_ids(1))
    _push(table, 1)
    _push(table, 1, 2)
    assert table.num_rows == 0 and table.num_pending == 2
    assert torch.equal(table.pull(_ids(1, 2)), torch.zeros(2, DIM))
    _push(table, 1, 2)  # id 1's third push: admitted, and this push's gradient applied
    assert 1 in table and 2 not in table
    assert torch.equal(table.pull(_ids(1))[0], torch.full((DIM,), -1.0))
    assert table.num_rows == 1 and table.num_admitted == 1 and table.num_pending == 1


def test_lru_eviction_order():
    table = RowTable(DIM, RowSGD(0.1), max_rows=3)
    for row_id in (1, 2, 3):
        _push(table, row_id)
    _push(table, 1)  # 1 is now the most recent; 2 is the least
    _push(table, 4)
    assert _held(table) == {1, 3, 4}
    _push(table, 5)
    assert _held(table) == {1, 4, 5}
    _push(table, 1, 6)  # a row pushed now is never the one evicted to make room
    assert _held(table) == {1, 5, 6}
    assert table.num_rows == 3 and table.num_evicted == 3 and table.num_admitted == 6
    assert table.capacity == 3  # never more slots than max_rows


def test_more_new_ids_than_room_wait_for_the_next_push():
    table = RowTable(DIM, RowSGD(0.1), max_rows=2, admit_after=2)
    _push(table, 1, 2)
    _push(table, 1, 2)
    _push(table, 3)
    _push(table, 1, 2, 3)  # 3's second push: no room beside two rows pushed now
    assert _held(table) == {1, 2} and table.num_pending == 1
    _push(table, 3)
    assert _held(table) == {2, 3}  # 1 and 2 tied on recency: the lower id goes first
    assert table.num_evicted == 1


def test_evicted_id_comes_back_as_a_fresh_row():
    table = RowTable(DIM, RowAdagrad(1.0), max_rows=1)
    _push(table, 1, grad=2.0)
    _push(table, 1, grad=2.0)
    _push(table, 2)  # evicts 1
    assert 1 not in table
    assert torch.equal(table.pull(_ids(1)), torch.zeros(1, DIM))
    _push(table, 1, grad=2.0)  # fresh: zero values and a zero accumulator
    fresh = RowTable(DIM, RowAdagrad(1.0))
    _push(fresh, 1, grad=2.0)
    assert torch.equal(table.pull(_ids(1)), fresh.pull(_ids(1)))
    assert table.num_admitted == 3 and table.num_evicted == 2


def test_ttl_drops_rows_not_pushed_recently():
    table = RowTable(DIM, RowSGD(0.1), ttl_steps=2)
    _push(table, 1, 2)  # step 1
    _push(table, 2)  # step 2
    assert _held(table) == {1, 2}
    _push(table, 3)  # step 3: 1 not pushed in steps 2 and 3
    assert _held(table) == {2, 3}
    _push(table, 3)  # step 4
    assert _held(table) == {3}
    assert table.num_evicted == 2 and table.num_steps == 4


def _pending(table: RowTable) -> dict[int, tuple[int, int]]:
    state = table.state_dict()
    return dict(
        zip(
            state["pending_ids"].tolist(),
            zip(state["pending_counts"].tolist(), state["pending_last_step"].tolist(), strict=True),
            strict=True,
        )
    )


def test_counts_of_ids_awaiting_admission_expire_with_the_time_to_live():
    table = RowTable(DIM, RowSGD(0.1), admit_after=3, ttl_steps=3)
    _push(table, 7)
    _push(table, 7, 8)
    assert _pending(table) == {7: (2, 2), 8: (1, 2)}
    _push(table, 9)
    _push(table, 9)
    assert _pending(table) == {7: (2, 2), 8: (1, 2), 9: (2, 4)}
    _push(table, 10)  # step 5: 7 and 8 were last pushed 3 steps ago
    assert _pending(table) == {9: (2, 4), 10: (1, 5)}
    _push(table, 7)  # forgotten: it counts from 1 again, no row
    assert 7 not in _held(table) and _pending(table)[7] == (1, 6)


def test_at_most_max_rows_ids_await_admission_least_recently_pushed_forgotten_first():
    table = RowTable(DIM, RowSGD(0.1), admit_after=4, max_rows=3)
    for row_id in range(1, 11):
        _push(table, row_id)
    assert sorted(_pending(table)) == [8, 9, 10]
    _push(table, 8)  # 8 is now the most recent: 9 goes first
    _push(table, 11, 5)  # two new ids: 9 and 10 are now the least recently pushed
    assert sorted(_pending(table)) == [5, 8, 11]
    assert table.num_rows == 0


def test_a_reloaded_table_forgets_pending_ids_in_the_same_order():
    table = RowTable(DIM, RowSGD(0.1), admit_after=5, max_rows=4, ttl_steps=4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        ids = torch.randperm(20, generator=generator)[:3].to(torch.int64)
        table.push(ids, torch.ones(3, DIM))
    reloaded = RowTable(DIM, RowSGD(0.1), admit_after=5, max_rows=4, ttl_steps=4)
    reloaded.load_state_dict(table.state_dict())
    for step in range(12):
        ids = torch.randperm(20, generator=generator)[: 1 + step % 3].to(torch.int64)
        for each in (table, reloaded):
            each.push(ids, torch.ones(ids.numel(), DIM))
        assert _pending(table) == _pending(reloaded)


def test_a_load_past_max_rows_is_cut_to_it_at_once_least_recently_pushed_first():
    # One shard's rows of several (a reshard onto fewer shards) can be more than its bound.
    unbounded = RowTable(DIM, RowAdagrad(0.5), admit_after=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):  # several ids per push: ties in recency, broken by id
        ids = torch.randperm(60, generator=generator)[:8]
        unbounded.push(ids, torch.randn(8, DIM, generator=generator))
    saved = unbounded.state_dict()
    num_saved, max_rows = saved["ids"].numel(), 7
    assert num_saved > max_rows and unbounded.num_pending > max_rows
    table = RowTable(DIM, RowAdagrad(0.5), admit_after=2, max_rows=max_rows)
    table.load_state_dict(saved)
    assert table.num_rows == max_rows and table.num_pending == max_rows
    assert table.capacity == max_rows  # the forgotten rows are not even allocated
    # saved lists rows least recently pushed first, ties by id: eviction's order.
    kept = table.state_dict()
    for key in ("ids", "values", "last_step"):
        assert torch.equal(kept[key], saved[key][num_saved - max_rows :]), key
    for name, tensor in saved["state"].items():
        assert torch.equal(kept["state"][name], tensor[num_saved - max_rows :])
    pending = sorted((step, i) for i, (_, step) in _pending(unbounded).items())
    assert sorted(_pending(table)) == sorted(i for _, i in pending[-max_rows:])
    assert table.num_evicted == unbounded.num_evicted + num_saved - max_rows
    assert table.num_admitted - table.num_evicted == table.num_rows
    _push(table, *range(100, 105))
    assert table.num_rows <= max_rows and table.num_pending <= max_rows


def test_capacity_grows_in_chunks_and_reuses_free_slots():
    table = RowTable(DIM, LazyAdam(), chunk_rows=4)
    assert table.capacity == 0
    capacities = []
    for row_id in range(9):
        _push(table, row_id)
        capacities.append(table.capacity)
    assert capacities == [4, 4, 4, 4, 8, 8, 8, 8, 16]
    _push(table, *range(100, 120))
    assert table.capacity == 32
    bounded = RowTable(DIM, RowSGD(0.1), chunk_rows=4, max_rows=5, ttl_steps=1)
    for row_id in range(50):
        _push(bounded, row_id)
    assert bounded.capacity == 4 and bounded.num_rows == 1


def test_a_chunk_of_wide_rows_stays_small():
    """1024 slots of a table 65536 floats wide were 256 MiB (512 MiB with Adagrad's state) for
    the few rows a shard held: a chunk takes at most GROWTH_CHUNK_BYTES, whole rows."""
    # A slot of 256 KiB + 16 bytes: chunks of 3; with Adagrad's state, 512 KiB + 16: of 1.
    for optimizer, capacities in ((RowSGD(0.1), (3, 6)), (RowAdagrad(0.1), (1, 4))):
        wide = RowTable(65536, optimizer)
        wide.push(_ids(1), torch.ones(1, 65536))
        first = wide.capacity
        wide.push(_ids(2, 3, 4), torch.ones(3, 65536))
        assert (first, wide.capacity) == capacities and wide.num_rows == 4
    narrow = RowTable(DIM, RowSGD(0.1))  # a narrow table's chunk is the whole 1024 rows
    _push(narrow, 1)
    assert narrow.capacity == 1024


def test_state_dict_round_trip():
    table = RowTable(DIM, RowAdagrad(0.5), admit_after=2, max_rows=6, init="normal", seed=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        ids = torch.randperm(12, generator=generator)[:5]
        table.push(ids, torch.randn(5, DIM, generator=generator))
    assert table.num_evicted > 0 and table.num_pending > 0
    saved = table.state_dict()
    loaded = RowTable(DIM, RowAdagrad(0.5), admit_after=2, max_rows=6, init="normal", seed=3)
    loaded.load_state_dict(saved)
    _assert_state_equal(loaded.state_dict(), saved)
    for _ in range(4):  # and they go on identically, LRU order included
        ids = torch.randperm(12, generator=generator)[:5]
        grads = torch.randn(5, DIM, generator=generator)
        table.push(ids, grads)
        loaded.push(ids, grads)
    _assert_state_equal(loaded.state_dict(), table.state_dict())


def _assert_state_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key == "state":
            assert got[key].keys() == value.keys()
            for name in value:
                assert torch.equal(got[key][name], value[name])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def test_load_rejects_another_optimizer_or_dim():
    saved = RowTable(DIM, RowAdagrad(0.5)).state_dict()
    with pytest.raises(ValueError, match="row-optimizer"):
        RowTable(DIM, LazyAdam()).load_state_dict(saved)
    with pytest.raises(ValueError, match="dim"):
        RowTable(DIM + 1, RowAdagrad(0.5)).load_state_dict(saved)


@pytest.mark.parametrize(
    ("saved_with", "loaded_with", "message"),
    [
        (LazyAdam(), RowAdagrad(0.5), "is for --row-optimizer adam, not adagrad"),
        (RowWiseAdagrad(0.5), RowSGD(0.5), "is for --row-optimizer rowwise-adagrad, not sgd"),
    ],
)
def test_another_optimizer_is_named_as_the_flag_takes_it(saved_with, loaded_with, message):
    # A shard restarted without the job's --row-optimizer is told the value to give.
    saved = RowTable(DIM, saved_with).state_dict()
    with pytest.raises(ValueError, match=re.escape(message)):
        RowTable(DIM, loaded_with).load_state_dict(saved)


def test_normal_init_is_reproducible_by_id():
    def build(seed: int) -> RowTable:
        return RowTable(8, RowSGD(0.0), init="normal", init_std=0.5, seed=seed)

    first, second, other_seed = build(1), build(1), build(2)
    first.push(_ids(5, -9, 1 << 40), torch.zeros(3, 8))
    second.push(_ids(1 << 40), torch.zeros(1, 8))
    second.push(_ids(-9, 5), torch.zeros(2, 8))
    other_seed.push(_ids(5), torch.zeros(1, 8))
    ids = _ids(5, -9, 1 << 40)
    assert torch.equal(first.pull(ids), second.pull(ids))
    assert not torch.equal(first.pull(_ids(5)), other_seed.pull(_ids(5)))
    many = RowTable(16, RowSGD(0.0), init="normal", init_std=0.5)
    many.push(torch.arange(2000), torch.zeros(2000, 16))
    values = many.pull(torch.arange(2000))
    assert abs(values.mean().item()) < 0.02
    assert abs(values.std().item() - 0.5) < 0.02


def test_callable_init():
    table = RowTable(DIM, RowSGD(0.0), init=lambda ids: ids[:, None].float().expand(-1, DIM))
    _push(table, 3, 8)
    assert torch.equal(table.pull(_ids(8, 3))[:, 0], torch.tensor([8.0, 3.0]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.push(_ids(1, 1), torch.zeros(2, DIM)), "unique"),
        (lambda t: t.push(_ids(1, 2), torch.zeros(2, DIM + 1)), "grads"),
        (lambda t: t.pull(torch.tensor([1.0])), "int64"),
        (lambda t: t.push(torch.tensor([[1]]), torch.zeros(1, DIM)), "1-D"),
    ],
)
def test_bad_calls(call, message):
    with pytest.raises(ValueError, match=message):
        call(RowTable(DIM, RowSGD(0.1)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"admit_after": 0}, "admit_after"),
        ({"max_rows": 0}, "max_rows"),
        ({"ttl_steps": 0}, "ttl_steps"),
        ({"init": "uniform"}, "init"),
        ({"chunk_rows": 0}, "chunk_rows"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RowTable(DIM, RowSGD(0.1), **kwargs)


def test_pushes_match_sparse_adam_on_an_embedding():
    # The table's step (its push count) is SparseAdam's step, rows gathered from pulls.
    embedding = torch.nn.Embedding(30, DIM, sparse=True)
    torch.nn.init.zeros_(embedding.weight)
    reference = torch.optim.SparseAdam(embedding.parameters(), lr=0.05)
    table = RowTable(DIM, LazyAdam(0.05), chunk_rows=8)
    generator = torch.Generator().manual_seed(5)
    for _ in range(8):
        ids = torch.randint(0, 30, (20,), generator=generator)
        targets = torch.randn(20, DIM, generator=generator)
        reference.zero_grad()
        ((embedding(ids) - targets) ** 2).sum().backward()
        reference.step()
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = table.pull(unique).requires_grad_()
        ((rows[inverse] - targets) ** 2).sum().backward()
        table.push(unique, rows.grad)
    everything = torch.arange(30)
    torch.testing.assert_close(table.pull(everything), embedding.weight.detach()[everything])
