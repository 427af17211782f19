"""The worker's row cache: fresh rows served for n_pull steps, least recently used dropped
first, local updates applied to held rows only; and the sharded modules' swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distbelief.embeddings.cache import RowCache, cache_rows_for
from distbelief.embeddings.modules import ShardedEmbedding, ShardedEmbeddingBag, swap_embeddings


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_rows_serve_until_they_are_max_age_steps_old():
    cache = RowCache(2, capacity=4, max_age_steps=2)
    cache.insert(_ids(1, 2), torch.tensor([[1.0, 1.0], [2.0, 2.0]]), step=0)
    rows, hit = cache.lookup(_ids(2, 3, 1), step=1)
    assert hit.tolist() == [True, False, True]
    assert torch.equal(rows, torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    _, hit = cache.lookup(_ids(1, 2), step=2)  # pulled at 0: too old at step 2
    assert not hit.any()
    assert (cache.hits, cache.misses) == (2, 3)


def test_least_recently_used_rows_go_first_and_this_steps_rows_stay():
    cache = RowCache(1, capacity=3, max_age_steps=10)
    cache.insert(_ids(1, 2, 3), torch.ones(3, 1), step=0)
    cache.lookup(_ids(1), step=1)  # 1 used at step 1; 2 and 3 last used at 0
    cache.insert(_ids(4), torch.ones(1, 1), step=2)
    assert len(cache) == 3
    _, hit = cache.lookup(_ids(1, 2, 3, 4), step=2)
    assert hit.tolist() == [True, False, True, True]
    # More new rows than room at one step: only what fits is kept, nothing used now is dropped.
    cache.insert(_ids(5, 6, 7, 8), torch.ones(4, 1), step=2)
    assert len(cache) == 3


def test_refreshing_stale_rows_never_evicts_them_to_make_room():
    cache = RowCache(1, capacity=2, max_age_steps=1)
    cache.insert(_ids(1, 2), torch.zeros(2, 1), step=0)
    # At step 1 both rows are stale; 1 is pulled again together with a new id 3.
    cache.insert(_ids(1, 3), torch.ones(2, 1), step=1)
    rows, hit = cache.lookup(_ids(1, 2, 3), step=1)
    assert hit.tolist() == [True, False, True] and torch.equal(rows, torch.ones(2, 1))
    cache.insert(_ids(4, 5), torch.full((2, 1), 2.0), step=2)  # evicts 1 and 3 cleanly
    assert len(cache) == 2


def test_local_updates_touch_held_rows_only():
    cache = RowCache(2, capacity=2, max_age_steps=5)
    cache.insert(_ids(1), torch.zeros(1, 2), step=0)
    cache.apply(_ids(1, 9), torch.tensor([[1.0, 2.0], [5.0, 5.0]]))
    rows, hit = cache.lookup(_ids(1, 9), step=1)
    assert hit.tolist() == [True, False] and torch.equal(rows, torch.tensor([[1.0, 2.0]]))


def test_budget_counts_every_byte_of_a_row():
    assert cache_rows_for(0, 32) == 0
    per_row = 32 * 4 + 16 + 120
    assert cache_rows_for(10 * per_row, 32) == 10
    assert RowCache(32, 10, 1).nbytes <= 10 * per_row


class _Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Embedding(10, 4)
        self.towers = nn.ModuleList([nn.EmbeddingBag(7, 3, mode="sum") for _ in range(2)])
        self.head = nn.Linear(4, 1)


def test_swap_replaces_every_table_or_the_named_ones():
    model = _Recommender()
    swapped = swap_embeddings(model)
    assert sorted(swapped) == ["towers.0", "towers.1", "users"]
    assert isinstance(model.users, ShardedEmbedding)
    assert isinstance(model.towers[1], ShardedEmbeddingBag) and model.towers[1].mode == "sum"
    assert [name for name, _ in model.named_parameters()] == ["head.weight", "head.bias"]
    partly = _Recommender()
    assert list(swap_embeddings(partly, ["towers.0"])) == ["towers.0"]
    assert isinstance(partly.users, nn.Embedding)


@pytest.mark.parametrize(
    ("names", "message"),
    [(["head"], "table 'head': the model has Linear there"), (["nope"], "has nothing there")],
)
def test_swap_names_what_is_not_a_table(names, message):
    with pytest.raises(ValueError, match=message):
        swap_embeddings(_Recommender(), names)


def test_unsupported_table_features_are_refused():
    model = nn.Sequential(nn.Embedding(5, 2, padding_idx=0))
    with pytest.raises(ValueError, match="table 0: padding_idx is not supported"):
        swap_embeddings(model)
