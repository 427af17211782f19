"""Partitioners: every byte owned exactly once, balance, row alignment, parameter groups."""

import pytest
import torch

from distbelief.sharding import (
    FlatLayout,
    FlatPartitioner,
    ParameterGroupPartitioner,
    RowAlignedPartitioner,
    TensorSpec,
    describe_mismatch,
    describe_partitioner,
    layout_fingerprint,
    partitioner_from_json,
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
GROUP = ("conv.bias", "embed", "half")
PARTITIONERS = {
    "flat": FlatPartitioner(),
    "row-aligned": RowAlignedPartitioner(),
    "group-flat": ParameterGroupPartitioner(FlatPartitioner(), GROUP),
    "group-rows": ParameterGroupPartitioner(RowAlignedPartitioner(), GROUP),
}


def _owned_count(partitioner, num_shards: int) -> dict[torch.dtype, torch.Tensor]:
    """How many shards own each element of each dtype group."""
    owned = {d: torch.zeros(n, dtype=torch.int64) for d, n in FlatLayout(SPECS).sizes.items()}
    for pieces in partitioner.partition(SPECS, num_shards):
        names = [piece.name for piece in pieces]
        assert len(set(names)) == len(names)  # a shard's slices travel under unique names
        for piece in pieces:
            assert 0 <= piece.start <= piece.stop
            owned[piece.dtype][piece.start : piece.stop] += 1
    return owned


def _in_group(spec: TensorSpec) -> bool:
    return spec.name in GROUP


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("name", ["flat", "row-aligned"])
def test_every_element_owned_by_exactly_one_shard(name, num_shards):
    for owned in _owned_count(PARTITIONERS[name], num_shards).values():
        assert bool((owned == 1).all())


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("name", ["group-flat", "group-rows"])
def test_a_group_is_owned_exactly_once_and_nothing_else_at_all(name, num_shards):
    owned = _owned_count(PARTITIONERS[name], num_shards)
    layout = FlatLayout(SPECS)
    views = dict(zip([s.name for s in SPECS], layout.views(owned), strict=True))
    for spec in SPECS:
        assert bool((views[spec.name] == (1 if _in_group(spec) else 0)).all()), spec.name


def test_flat_slices_are_the_byte_balanced_ranges():
    float_total, half_total = 150 + 6 + 16000 + 10, 21
    for shard_id, pieces in enumerate(FlatPartitioner().partition(SPECS, 3)):
        assert [(p.dtype, p.start, p.stop) for p in pieces] == [
            (torch.float32, float_total * shard_id // 3, float_total * (shard_id + 1) // 3),
            (torch.float16, half_total * shard_id // 3, half_total * (shard_id + 1) // 3),
        ]


@pytest.mark.parametrize("num_shards", [2, 3, 5, 7, 16])
def test_row_aligned_never_splits_a_row_and_balances_within_a_row(num_shards):
    pieces = RowAlignedPartitioner().partition(SPECS, num_shards)
    for dtype, total in FlatLayout(SPECS).sizes.items():
        cuts = {piece.start for shard in pieces for piece in shard if piece.dtype == dtype}
        offset, widest_row = 0, 1
        for spec in (s for s in SPECS if s.dtype == dtype):
            row = spec.numel // spec.shape[0] if len(spec.shape) > 1 else 1
            widest_row = max(widest_row, row)
            inside = [c - offset for c in cuts if offset < c < offset + spec.numel]
            assert all(c % row == 0 for c in inside), (spec.name, inside)
            offset += spec.numel
        sizes = [p.numel for shard in pieces for p in shard if p.dtype == dtype]
        assert all(abs(size - total / num_shards) <= widest_row + 1 for size in sizes)
        assert sum(sizes) == total


def test_row_aligned_differs_from_flat_where_flat_cuts_a_row():
    flat = FlatPartitioner().partition(SPECS, 7)
    rows = RowAlignedPartitioner().partition(SPECS, 7)
    embed_start = 150 + 6
    flat_cut = flat[1][0].start
    assert (flat_cut - embed_start) % 16 != 0  # the flat cut lands inside an embedding row
    assert (rows[1][0].start - embed_start) % 16 == 0
    assert abs(rows[1][0].start - flat_cut) <= 8


@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_bytes_balanced_within_one_element_per_dtype(num_shards):
    sizes = [
        sum(piece.numel * piece.dtype.itemsize for piece in shard)
        for shard in FlatPartitioner().partition(SPECS, num_shards)
    ]
    assert max(sizes) - min(sizes) <= 4 + 2  # one float32 and one float16 element


def test_large_tensor_is_split_across_shards():
    owners = [
        shard_id
        for shard_id, shard in enumerate(FlatPartitioner().partition(SPECS, 4))
        for piece in shard
        if piece.dtype == torch.float32 and piece.start < 150 + 16000 and piece.stop > 156
    ]
    assert len(set(owners)) > 1


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_partition_rejects_bad_arguments(name):
    with pytest.raises(ValueError, match="num_shards"):
        PARTITIONERS[name].partition(SPECS, 0)
    with pytest.raises(ValueError, match=r"no parameters|not parameters"):
        PARTITIONERS[name].partition([], 2)


def test_group_names_must_be_parameters():
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        ParameterGroupPartitioner(FlatPartitioner(), ["embed", "nope"]).partition(SPECS, 2)
    with pytest.raises(ValueError, match="at least one"):
        ParameterGroupPartitioner(FlatPartitioner(), [])


def test_more_shards_than_group_elements_leaves_empty_slices():
    group = ParameterGroupPartitioner(FlatPartitioner(), ["conv.bias"])
    pieces = group.partition(SPECS, 8)
    assert all(len(shard) == 1 for shard in pieces)  # every shard still has a buffer
    assert sum(shard[0].numel for shard in pieces) == 6
    assert {shard[0].start for shard in pieces if not shard[0].numel} <= set(range(150, 157))


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_partitioner_json_round_trip(name):
    partitioner = PARTITIONERS[name]
    again = partitioner_from_json(partitioner.to_json())
    assert describe_partitioner(again) == describe_partitioner(partitioner)
    assert again.partition(SPECS, 3) == partitioner.partition(SPECS, 3)


def test_descriptions_tell_partitioners_apart():
    descriptions = {describe_partitioner(p) for p in PARTITIONERS.values()}
    assert len(descriptions) == len(PARTITIONERS)
    same_group = ParameterGroupPartitioner(FlatPartitioner(), reversed(GROUP))
    assert describe_partitioner(same_group) == describe_partitioner(PARTITIONERS["group-flat"])


@pytest.mark.parametrize(
    "raw",
    [None, {}, {"kind": "hash"}, {"kind": "flat", "x": 1}, {"kind": "parameter-group"}],
)
def test_malformed_partitioner_description_is_refused(raw):
    with pytest.raises(ValueError, match="partitioner"):
        partitioner_from_json(raw)


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
    assert "another name" not in describe_mismatch(SPECS, changed)  # another shape


def test_a_tensor_named_otherwise_alone_is_said_to_be_renamed():
    """Parameters of submodules given without model= (their names repeat: weight, bias) are
    named by position: the shards' names differ, and the refusal said only that."""
    renamed = [TensorSpec("param.0", SPECS[0].shape, SPECS[0].dtype), *SPECS[1:]]
    assert "another name" not in describe_mismatch(SPECS, renamed)  # a checkpoint's, say
    said = describe_mismatch(SPECS, renamed, client=True)
    assert said.startswith(f"tensor 'param.0' {list(SPECS[0].shape)} float32 does not match")
    assert said.endswith(
        "(the same tensor by another name: a DownpourSGD names its parameters as its model= "
        "does, else as named_parameters() gave them where no name repeats, else param.I by "
        "position)"
    )
    with pytest.raises(ValueError, match="shape"):
        specs_from_json([["w", [-1], "float32"]])
