"""DownpourSGD used as torch.optim users use an optimizer, against real shard processes: a
GradScaler, LR schedulers, state-dict hooks, a compiled model; one worker, blocking pushes and
pulls and SGD on the shards at the worker's rate give torch.optim.SGD's parameters."""

from __future__ import annotations

import torch
from torch import nn

from distbelief.embeddings import ShardedEmbeddings
from distbelief.optim import DownpourSGD


class _Recommender(nn.Module):
    """A table and a dense layer: names for both kinds of thing the shards hold."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.items = nn.Embedding(20, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.items(ids).sum(1))


def test_a_compiled_model_and_a_plain_one_name_their_tensors_and_tables_alike(shard_cluster):
    """torch.compile's wrapper lists its model's names under ``_orig_mod.``: a compiled replica
    initialised the shards with those, and a plain replica (or an evaluator) was refused."""
    addresses = shard_cluster(1, "--server-lr", "0.1")
    compiled = torch.compile(_Recommender(seed=0))
    tables = ShardedEmbeddings(compiled, ps=addresses, blocking=True, timeout_s=30)
    optimizer = DownpourSGD(compiled.parameters(), model=compiled, ps=addresses, timeout_s=30)
    plain = _Recommender(seed=1)  # another init: the shards' values must win
    assert [spec.name for spec in optimizer.specs] == ["head.weight", "head.bias"]
    assert {module.table for module in tables.modules.values()} == {"items"}
    with ShardedEmbeddings(plain, ps=addresses, timeout_s=30) as plain_tables:
        assert set(plain_tables.dims) == {"items"}
        with DownpourSGD(plain.parameters(), model=plain, ps=addresses, timeout_s=30):
            for got, want in zip(plain.head.parameters(), compiled.head.parameters(), strict=True):
                assert torch.equal(got, want)
    optimizer.close()
    tables.close()
