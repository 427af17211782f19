"""Compression math: narrowed round trips within their dtype's rounding bound, top-k with error
feedback loses nothing (exactly, in float64), the shard's decoding refuses malformed pushes, and
what the server optimizers do with a sparse push."""

from __future__ import annotations

import pytest
import torch

from distbelief.client.compression import NarrowPullStaging, PushCompressor, encode_slice
from distbelief.config import JobConfig
from distbelief.errors import ConfigFieldError
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server.compressed import CompressedSlices
from distbelief.sharding import FlatLayout, FlatPartitioner, TensorSpec
from distbelief.wire.compression import (
    INDICES_SUFFIX,
    VALUES_SUFFIX,
    WireCompression,
    decode_push_into,
    decode_sparse_into,
)

BF16 = WireCompression.parse("bf16")
FP16 = WireCompression.parse("fp16")
TOPK = WireCompression.parse("fp32", "topk:0.01")
TOPK_BF16 = WireCompression.parse("bf16", "topk:0.01")


def _decode(tensors, like: torch.Tensor, compression: WireCompression) -> torch.Tensor:
    out = torch.empty_like(like)
    name = tensors[0][0].removesuffix(INDICES_SUFFIX)
    decode_push_into([out], [name], tensors, sparse=compression.topk_fraction is not None)
    return out


def _wide_range(num: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Values of both signs over many orders of magnitude (1e-30 .. 1e30)."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.empty(num, dtype=torch.float64).uniform_(-30, 30, generator=generator)
    signs = torch.randint(0, 2, (num,), generator=generator) * 2 - 1
    return (signs * 10.0**exponents).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_round_trip_is_within_half_a_bf16_ulp_and_the_rest_stays_behind(dtype):
    original = _wide_range(4096, dtype)
    accrued = original.clone()
    tensors = encode_slice(accrued, "float32[0:4096]", BF16)
    assert [(name, t.dtype) for name, t in tensors] == [("float32[0:4096]", torch.bfloat16)]
    decoded = _decode(tensors, original, BF16)
    # Round to nearest with 8 significant bits: the error is at most 2**-8 of the value.
    assert torch.all((decoded - original).abs() <= 2.0**-8 * original.abs())
    assert torch.equal(decoded + accrued, original)  # the rounding is what stays accrued


def test_fp16_round_trip_is_within_its_bound_and_saturates_instead_of_overflowing():
    inside = torch.cat([torch.linspace(-65000.0, 65000.0, 1001), _wide_range(500) * 1e-27])
    accrued = inside.clone()
    decoded = _decode(encode_slice(accrued, "x", FP16), inside, FP16)
    # Normal range: 11 significant bits; below it, subnormals are 2**-24 apart.
    assert torch.all(
        (decoded - inside).abs() <= torch.maximum(2.0**-11 * inside.abs(), 2.0**-25 * torch.ones(1))
    )
    assert torch.equal(decoded + accrued, inside)
    huge = torch.tensor([1e6, -3e5, 7.0])
    accrued = huge.clone()
    decoded = _decode(encode_slice(accrued, "x", FP16), huge, FP16)
    assert torch.equal(decoded, torch.tensor([65504.0, -65504.0, 7.0]))
    assert torch.equal(decoded + accrued, huge)


def test_a_narrowed_pull_widens_within_the_bf16_bound():
    shard_side = CompressedSlices(
        FlatPartitioner().partition([TensorSpec("w", (300,), torch.float32)], 1)[0]
    )
    values = _wide_range(300)
    sent = shard_side.pull_tensors({"wire_dtype": "bfloat16"}, [("float32[0:300]", values)], 1)
    assert [(name, t.dtype) for name, t in sent] == [("float32[0:300]", torch.bfloat16)]
    target = torch.full((300,), float("nan"))
    staging, targets = NarrowPullStaging(torch.bfloat16), {"float32[0:300]": target}
    received = staging.sink("float32[0:300]", targets)
    received.copy_(sent[0][1])
    staging.widen(targets)
    assert torch.all((target - values).abs() <= 2.0**-8 * values.abs())
    values.mul_(2)  # a new generation is narrowed again; the same one is not
    assert (
        sent[0][1]
        is shard_side.pull_tensors({"wire_dtype": "bfloat16"}, [("float32[0:300]", values)], 1)[0][
            1
        ]
    )
    again = shard_side.pull_tensors({"wire_dtype": "bfloat16"}, [("float32[0:300]", values)], 2)
    assert torch.equal(again[0][1], values.to(torch.bfloat16))


@pytest.mark.parametrize("compression", [TOPK, TOPK_BF16], ids=["topk", "topk+bf16"])
def test_top_k_with_error_feedback_pushes_the_sum_of_the_gradients_exactly(compression):
    """sum(decoded pushes) + residual == sum(gradients), bit for bit, in float64. The gradients
    are multiples of 2**-6 below 2**10, so every sum of them is exact in float64, and so is
    every rounding to bfloat16 and its remainder: any difference would be a lost gradient."""
    generator = torch.Generator().manual_seed(3)
    accrued = torch.zeros(1000, dtype=torch.float64)
    pushed = torch.zeros(1000, dtype=torch.float64)
    total = torch.zeros(1000, dtype=torch.float64)
    for _ in range(200):
        gradient = torch.randint(-(2**16), 2**16, (1000,), generator=generator).double() / 64
        total += gradient
        accrued += gradient
        tensors = encode_slice(accrued, "g", compression)
        assert tensors[0][1].numel() == 10  # 1% of 1000
        pushed += _decode(tensors, accrued, compression)
    assert torch.equal(pushed + accrued, total)
    assert accrued.abs().sum() > 0  # something was held back all along


def test_top_k_error_feedback_of_random_gradients_agrees_to_float64_rounding():
    generator = torch.Generator().manual_seed(4)
    accrued = torch.zeros(5000, dtype=torch.float64)
    pushed, total = torch.zeros_like(accrued), torch.zeros_like(accrued)
    for _ in range(100):
        gradient = torch.randn(5000, dtype=torch.float64, generator=generator)
        total += gradient
        accrued += gradient
        pushed += _decode(encode_slice(accrued, "g", TOPK_BF16), accrued, TOPK_BF16)
    torch.testing.assert_close(pushed + accrued, total, rtol=0, atol=1e-12)


def test_top_k_sends_the_elements_of_largest_magnitude_and_keeps_the_rest():
    values = torch.tensor([0.5, -9.0, 0.1, 3.0, -0.2, 8.0, 0.0, -0.3, 0.05, 1.0])
    accrued = values.clone()
    tensors = encode_slice(accrued, "v", WireCompression(topk_fraction=0.3))
    names = [name for name, _ in tensors]
    assert names == ["v" + INDICES_SUFFIX, "v" + VALUES_SUFFIX]
    indices, sent = tensors[0][1], tensors[1][1]
    assert indices.dtype == torch.int32
    assert sorted(indices.tolist()) == [1, 3, 5]
    assert sorted(sent.tolist()) == [-9.0, 3.0, 8.0]
    assert torch.equal(accrued, values.index_fill(0, indices.long(), 0))


def test_push_compressor_encodes_every_shards_slices_and_they_decode_to_the_gradient():
    specs = [TensorSpec("w", (40, 25), torch.float32), TensorSpec("b", (25,), torch.float32)]
    slices = FlatPartitioner().partition(specs, 3)
    layout = FlatLayout(specs)
    gradient = torch.randn(1025)
    accrued = {torch.float32: gradient.clone()}
    encoded = PushCompressor(TOPK_BF16, slices).encode(accrued)
    assert encoded.meta == {"wire_dtype": "bfloat16", "sparse": True}
    decoded = layout.allocate()[torch.float32]
    for pieces, tensors in zip(slices, encoded.shard_tensors, strict=True):
        outs = [decoded[p.start : p.stop] for p in pieces]
        decode_push_into(outs, [p.name for p in pieces], tensors, sparse=True)
    torch.testing.assert_close(decoded + accrued[torch.float32], gradient, rtol=0, atol=0)
    assert int((decoded != 0).sum()) == sum(max(1, -(-p.numel // 100)) for s in slices for p in s)


@pytest.mark.parametrize(
    ("indices", "values", "problem"),
    [
        (torch.tensor([0, 10]), torch.ones(2), "not all in [0, 10)"),
        (torch.tensor([-1]), torch.ones(1), "not all in [0, 10)"),
        (torch.tensor([1.0]), torch.ones(1), "int32/int64"),
        (torch.tensor([1, 2]), torch.ones(3), "one value per index"),
        (torch.arange(11) % 10, torch.ones(11), "11 indices for 10 elements"),
    ],
)
def test_a_malformed_sparse_slice_is_refused(indices, values, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace(")", r"\)")):
        decode_sparse_into(torch.zeros(10), "s", indices, values)


def test_repeated_indices_add_up_and_a_push_must_name_its_slices():
    out = torch.full((4,), 7.0)
    decode_sparse_into(out, "s", torch.tensor([2, 2], dtype=torch.int32), torch.tensor([1.0, 2.0]))
    assert out.tolist() == [0.0, 0.0, 3.0, 0.0]
    with pytest.raises(ValueError, match="push must carry"):
        decode_push_into(
            [out], ["s"], [("t#indices", torch.zeros(0, dtype=torch.int32))], sparse=True
        )


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_a_sparse_push_leaves_unsent_elements_of_sgd_and_adagrad_shards_untouched(optimizer):
    """The shard applies a top-k push as a dense gradient that is zero where nothing was sent:
    SGD and Adagrad then leave those elements exactly as they were (momentum and Adam keep
    moving them by their state, as torch.optim does for any zero gradient)."""
    specs = [TensorSpec("w", (200,), torch.float32)]
    piece = FlatPartitioner().partition(specs, 1)[0]
    shard = ParameterShard(0, 1, server_optimizer_factory(optimizer, lr=0.1))
    start = torch.randn(200)
    shard.initialize(specs, [start.clone()])
    for _ in range(3):
        dense = torch.randn(200)
        shard.push([dense])  # every element has optimizer state now
    before = shard.parameters()[0]
    accrued = torch.randn(200)
    tensors = encode_slice(accrued, piece[0].name, WireCompression(topk_fraction=0.05))
    gradient = torch.empty(200)
    decode_push_into([gradient], [piece[0].name], tensors, sparse=True)
    shard.push([gradient])
    after = shard.parameters()[0]
    sent = tensors[0][1].long()
    unsent = torch.ones(200, dtype=torch.bool).index_fill(0, sent, False)
    assert torch.equal(after[unsent], before[unsent])
    assert torch.all(after[sent] != before[sent])


def test_wire_flags_are_validated_naming_the_setting():
    assert WireCompression.parse("bf16", "topk:0.01") == WireCompression(torch.bfloat16, 0.01)
    assert WireCompression.parse() == WireCompression()
    with pytest.raises(ValueError, match="wire_dtype must be one of fp32, bf16, fp16, got 'int8'"):
        WireCompression.parse("int8")
    assert WireCompression.parse("fp32", None) == WireCompression()  # None: not given
    spelled_loosely = ("topk:0.1 ", "topk: 0.1", "topk:0.0_1", " none", "")
    for bad in ("topk", "topk:0", "topk:1.5", "topk:x", "random:0.1", "none:1", *spelled_loosely):
        with pytest.raises(ValueError, match=f"push_compression must be none or topk:F.*{bad!r}"):
            WireCompression.parse("fp32", bad)
        with pytest.raises(ConfigFieldError) as refused:
            JobConfig.from_fields({"optimizer.push_compression": bad})
        assert refused.value.field == "optimizer.push_compression"
    assert WireCompression.parse("fp32", "topk:1").topk_count(7) == 7
    assert WireCompression.parse("fp32", "topk:0.001").topk_count(7) == 1


def test_an_fp16_pull_saturates_and_a_pull_of_another_dtype_is_refused():
    shard_side = CompressedSlices(
        FlatPartitioner().partition([TensorSpec("w", (3,), torch.float32)], 1)[0]
    )
    values = [("float32[0:3]", torch.tensor([1e6, -1e6, 0.5]))]
    sent = shard_side.pull_tensors({"wire_dtype": "float16"}, values, 1)
    assert sent[0][1].dtype == torch.float16
    assert sent[0][1].tolist() == [65504.0, -65504.0, 0.5]
    with pytest.raises(ValueError, match="bfloat16 or float16, not 'int8'"):
        shard_side.pull_tensors({"wire_dtype": "int8"}, values, 2)
