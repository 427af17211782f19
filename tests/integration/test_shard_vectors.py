"""ShardVectors against two real shard processes on 127.0.0.1: programs combine to the whole
vectors' values, bundles count exactly once, and a program's checkpoint tag saves every shard."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distbelief.client import ParameterServerClient, ShardVectors
from distbelief.errors import EvaluationNotOpenError, RemoteError
from distbelief.server.checkpoint import load_checkpoint
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire.vector_program import Program

NUM_SHARDS = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _connect(addresses: list[str]) -> tuple[ShardVectors, FlatLayout, torch.Tensor]:
    """A handshake with a small float64 model; its ShardVectors, layout and initial values."""
    model = _model()
    specs = tensor_specs(model.named_parameters())
    layout = FlatLayout(specs)
    initial = layout.flatten(list(model.parameters()))
    client = ParameterServerClient(addresses, specs, timeout_s=30, retry_timeout_s=5)
    assert client.handshake(initial)
    return ShardVectors(client), layout, initial[torch.float64].clone()


def _random(layout: FlatLayout, seed: int) -> dict[torch.dtype, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        torch.float64: torch.randn(
            layout.sizes[torch.float64], generator=generator, dtype=torch.float64
        )
    }


def test_programs_combine_to_the_whole_vectors_values(shard_cluster):
    vectors, layout, initial = _connect(shard_cluster(NUM_SHARDS))
    try:
        flat = layout.allocate()
        vectors.read("param", flat)
        assert torch.equal(flat[torch.float64], initial)

        program = Program()
        program.copy("d", "param")
        program.scale("d", -0.5)
        program.combine("t", [(2.0, "param"), (3.0, "d")])
        slope = program.dot("param", "t")
        norm = program.abs_sum("d")
        top = program.max_abs("t")
        values = program.get_value("absent")
        results = vectors.run(program)
        t = 2.0 * initial + 3.0 * (-0.5 * initial)
        assert results[slope] == pytest.approx(float(torch.dot(initial, t)), rel=1e-12)
        assert results[norm] == pytest.approx(float((0.5 * initial).abs().sum()), rel=1e-12)
        assert results[top] == pytest.approx(float(t.abs().max()), rel=1e-12)
        assert results[values] == [None] * NUM_SHARDS
        vectors.read("t", flat)
        torch.testing.assert_close(flat[torch.float64], t, rtol=0, atol=1e-15)

        program = Program()
        program.scale("t", 1e308)
        program.scale("t", 1e308)  # overflows on the shards: infinity travels back as such
        overflow = program.max_abs("t")
        assert vectors.run(program)[overflow] == math.inf
        with pytest.raises(RemoteError, match="no vector 'nowhere'"):
            vectors.run([["dot", "param", "nowhere"]])
        with pytest.raises(RemoteError, match="no checkpoint folder"):
            vectors.run(Program(), checkpoint="lbfgs-000001")
        with pytest.raises(ValueError, match="NaN or infinity"):
            vectors.run([["scale", "t", math.nan]])
        with pytest.raises(ValueError, match="plain folder name"):
            vectors.run(Program(), checkpoint="../elsewhere")
    finally:
        vectors.client.close()


def test_a_bundle_counts_exactly_once(shard_cluster):
    vectors, layout, _ = _connect(shard_cluster(NUM_SHARDS))
    try:
        first, second = _random(layout, 1), _random(layout, 2)
        program = Program()
        program.open_evaluation(1, "grad")
        vectors.run(program)
        vectors.push_bundle(1, "w0-s-1", first)
        vectors.push_bundle(1, "w0-s-1", first)  # a retried push replaces, never adds
        vectors.push_bundle(1, "w1-s-1", second)  # never committed
        program = Program()
        program.commit(1, "w0-s-1")
        program.commit(1, "w0-s-1")
        vectors.run(program)
        vectors.push_bundle(1, "w0-s-1", first)  # after its commit: counted once still
        program = Program()
        program.commit(1, "w0-s-1")
        total = program.dot("grad", "grad")
        program.close_evaluation(1)
        results = vectors.run(program)
        whole = first[torch.float64]
        assert results[total] == pytest.approx(float(torch.dot(whole, whole)), rel=1e-12)
        flat = layout.allocate()
        vectors.read("grad", flat)
        assert torch.equal(flat[torch.float64], whole)
        with pytest.raises(EvaluationNotOpenError, match="not open"):
            vectors.push_bundle(1, "w1-s-2", second)
    finally:
        vectors.client.close()


def test_a_checkpoint_tag_saves_every_shard_under_it(shard_cluster, tmp_path):
    addresses = shard_cluster(NUM_SHARDS, "--checkpoint-dir", str(tmp_path))
    vectors, layout, initial = _connect(addresses)
    try:
        program = Program()
        program.copy("d", "param")
        program.scale("d", 2.0)
        program.set_value("lbfgs", {"iteration": 12})
        vectors.run(program, checkpoint="lbfgs-000012")
        # Moved on past the checkpoint, then back to it (a restarted coordinator's way).
        later = Program()
        later.axpy("param", 1.0, "d")
        later.drop("d")
        later.set_value("lbfgs", {"iteration": 13})
        vectors.run(later)
        back = Program()
        value = back.get_value("lbfgs")
        assert vectors.run(back, restore="lbfgs-000012")[value] == [{"iteration": 12}] * NUM_SHARDS
        restored = layout.allocate()
        vectors.read("param", restored)
        assert torch.equal(restored[torch.float64], initial)
        vectors.read("d", restored)
        assert torch.equal(restored[torch.float64], 2.0 * initial)
        with pytest.raises(RemoteError, match="no checkpoint"):
            vectors.run(Program(), restore="lbfgs-000099")
    finally:
        vectors.client.close()
    flat = layout.allocate()[torch.float64]
    for shard_id in range(NUM_SHARDS):
        state = load_checkpoint(tmp_path / "lbfgs-000012", shard_id)
        assert state is not None, f"shard {shard_id} saved nothing under the tag"
        assert state.values["store"]["values"] == {"lbfgs": {"iteration": 12}}
        piece = vectors.client.slices[shard_id][0]
        flat[piece.start : piece.stop] = state.tensors["d.0"]
    assert torch.equal(flat, 2.0 * initial)
