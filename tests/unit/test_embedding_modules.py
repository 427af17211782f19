"""The sharded embedding modules compute what nn.EmbeddingBag / nn.Embedding compute, forward
and backward, in every mode and input form (rows served from a weight held in the test)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distbelief.embeddings.modules import ShardedEmbedding, ShardedEmbeddingBag


class _WeightRows:
    """A row source over a whole weight: the rows of the distinct ids, as a fresh leaf."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.leaves: list[tuple[torch.Tensor, torch.Tensor]] = []

    def lookup(self, table: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        rows = self.weight[unique].detach().requires_grad_(True)
        self.leaves.append((unique, rows))
        return rows, inverse


def _dense_grad(source: _WeightRows) -> torch.Tensor:
    grad = torch.zeros_like(source.weight)
    for unique, rows in source.leaves:
        grad.index_add_(0, unique, rows.grad)
    return grad


def _compare(reference: nn.Module, sharded: nn.Module, *inputs, **kwargs) -> None:
    source = _WeightRows(reference.weight.detach().clone())
    sharded.source = source
    expected = reference(*inputs, **kwargs)
    got = sharded(*inputs, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (got * upstream).sum().backward()
    reference_grad = reference.weight.grad
    if reference_grad.is_sparse:
        reference_grad = reference_grad.to_dense()
    torch.testing.assert_close(_dense_grad(source), reference_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("bag_size", [1, 3])
def test_bags_of_equal_size_match_embedding_bag(mode, bag_size):
    torch.manual_seed(0)
    reference = nn.EmbeddingBag(20, 5, mode=mode, sparse=mode != "max")
    ids = torch.randint(0, 8, (16, bag_size))  # few ids: repeats within and across bags
    _compare(reference, ShardedEmbeddingBag("t", 20, 5, mode=mode), ids)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bags_given_by_offsets_match_embedding_bag(mode):
    torch.manual_seed(1)
    reference = nn.EmbeddingBag(20, 5, mode=mode)
    ids = torch.randint(0, 20, (12,))
    offsets = torch.tensor([0, 2, 2, 7, 11])  # an empty bag among them
    _compare(reference, ShardedEmbeddingBag("t", 20, 5, mode=mode), ids, offsets)


def test_weighted_bags_match_embedding_bag():
    torch.manual_seed(2)
    reference = nn.EmbeddingBag(20, 5, mode="sum")
    ids = torch.randint(0, 20, (6, 3))
    weights = torch.rand(6, 3)
    sharded = ShardedEmbeddingBag("t", 20, 5, mode="sum")
    _compare(reference, sharded, ids, per_sample_weights=weights)


def test_lookups_match_embedding():
    torch.manual_seed(3)
    reference = nn.Embedding(20, 5)
    _compare(reference, ShardedEmbedding("t", 20, 5), torch.randint(0, 20, (4, 6)))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_an_empty_batch_of_bags_of_equal_size_matches_embedding_bag(mode):
    reference = nn.EmbeddingBag(20, 5, mode=mode)
    ids = torch.zeros(0, 3, dtype=torch.int64)
    _compare(reference, ShardedEmbeddingBag("t", 20, 5, mode=mode), ids)
