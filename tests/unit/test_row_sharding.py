"""Row sharding: stable, uniform id-to-shard hashing and per-shard grouping of a batch."""

from __future__ import annotations

import pytest
import torch

from distbelief.sharding.rows import mix64, row_shard, split_by_shard

_MASK64 = (1 << 64) - 1
_EDGE_IDS = [0, 1, 2, -1, 12345, -(1 << 63), (1 << 63) - 1, 42]


def _reference_mix(value: int) -> int:
    """splitmix64 on Python ints (the published constants), as a signed int64."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def test_mix_matches_reference_splitmix64():
    ids = torch.tensor(_EDGE_IDS + list(range(-50, 50)), dtype=torch.int64)
    expected = [_reference_mix(value & _MASK64) for value in ids.tolist()]
    assert mix64(ids).tolist() == expected


def test_known_shards_are_pinned():
    # Pinned: a change here moves rows between shards and breaks existing checkpoints.
    ids = torch.tensor(_EDGE_IDS, dtype=torch.int64)
    assert row_shard(ids, 8).tolist() == [7, 0, 7, 0, 0, 5, 3, 2]
    assert row_shard(ids, 7).tolist() == [4, 4, 2, 0, 6, 6, 4, 2]
    assert row_shard(ids, 1).tolist() == [0] * len(_EDGE_IDS)


@pytest.mark.parametrize("num_shards", [3, 8, 13])
def test_spread_is_roughly_uniform(num_shards):
    for ids in (torch.arange(100_000), torch.arange(-100_000, 0), torch.arange(100_000) * 1024):
        counts = torch.bincount(row_shard(ids, num_shards), minlength=num_shards)
        mean = ids.numel() / num_shards
        assert ((counts - mean).abs() <= 0.1 * mean).all(), counts.tolist()


def test_split_by_shard_groups_and_scatters_back():
    ids = torch.tensor([5, -7, 5, 99, 0, -(1 << 62), 3, 3], dtype=torch.int64)
    groups = split_by_shard(ids, 4)
    assert len(groups) == 4
    owners = row_shard(ids, 4)
    rebuilt = torch.full_like(ids, 777)
    for shard, (positions, shard_ids) in enumerate(groups):
        assert (owners[positions] == shard).all()
        assert torch.equal(shard_ids, ids[positions])
        assert torch.equal(positions, positions.sort().values)
        rebuilt[positions] = shard_ids
    assert torch.equal(rebuilt, ids)
    assert sum(positions.numel() for positions, _ in groups) == ids.numel()


def test_empty_batch():
    groups = split_by_shard(torch.empty(0, dtype=torch.int64), 3)
    assert [positions.numel() for positions, _ in groups] == [0, 0, 0]


@pytest.mark.parametrize(
    ("ids", "num_shards", "message"),
    [
        (torch.tensor([1, 2], dtype=torch.int32), 2, "int64"),
        (torch.tensor([[1]]), 2, "1-D"),
        ([1, 2], 2, "list"),
        (torch.tensor([1]), 0, "num_shards"),
    ],
)
def test_bad_input(ids, num_shards, message):
    with pytest.raises(ValueError, match=message):
        row_shard(ids, num_shards)
