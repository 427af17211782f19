import pytest
import torch

from distbelief.sharding import (
    FlatLayout,
    TensorSpec,
    describe_mismatch,
    layout_fingerprint,
    partition,
    specs_from_json,
    specs_to_json,
)

SPECS = [
    TensorSpec("conv.weight", (6, 1, 5, 5), torch.float32),
    TensorSpec("conv.bias", (6,), torch.float32),
    TensorSpec("embed", (1000, 16), torch.float32),
    TensorSpec("half", (7, 3), torch.float16),
    TensorSpec("fc.bias", (10,), torch.float32),
]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 16])
def test_every_element_owned_by_exactly_one_shard(num_shards):
    slices = partition(SPECS, num_shards)
    for dtype, total in FlatLayout(SPECS).sizes.items():
        owned = torch.zeros(total, dtype=torch.int64)
        for shard in slices:
            for piece in shard:
                if piece.dtype == dtype:
                    owned[piece.start : piece.stop] += 1
        assert bool((owned == 1).all())


@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_bytes_balanced_within_one_element_per_dtype(num_shards):
    sizes = [
        sum(piece.numel * piece.dtype.itemsize for piece in shard)
        for shard in partition(SPECS, num_shards)
    ]
    assert max(sizes) - min(sizes) <= 4 + 2  # one float32 and one float16 element


def test_large_tensor_is_split_across_shards():
    owners = [
        shard_id
        for shard_id, shard in enumerate(partition(SPECS, 4))
        for piece in shard
        if piece.dtype == torch.float32 and piece.start < 150 + 16000 and piece.stop > 156
    ]
    assert len(set(owners)) > 1


def test_partition_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_shards"):
        partition(SPECS, 0)
    with pytest.raises(ValueError, match="no parameters"):
        partition([], 2)


def test_flat_layout_views_round_trip():
    layout = FlatLayout(SPECS)
    tensors = [torch.randn(spec.shape).to(spec.dtype) for spec in SPECS]
    flats = layout.flatten(tensors)
    for original, view in zip(tensors, layout.views(flats), strict=True):
        assert torch.equal(original, view)
    assert flats[torch.float32].numel() == 150 + 6 + 16000 + 10


def test_specs_json_round_trip_and_fingerprint():
    assert specs_from_json(specs_to_json(SPECS)) == SPECS
    changed = [*SPECS[:-1], TensorSpec("fc.bias", (11,), torch.float32)]
    assert layout_fingerprint(SPECS) != layout_fingerprint(changed)
    assert "fc.bias" in describe_mismatch(SPECS, changed)
    with pytest.raises(ValueError, match="shape"):
        specs_from_json([["w", [-1], "float32"]])
