"""Stage memory: DownpourSGD's five copies per parameter, and what splitting a wide model saves."""

from __future__ import annotations

import itertools

from torch import nn

from distbelief.models import build_model
from distbelief.pipeline.layers import build_on_meta, pipeline_layers
from distbelief.pipeline.memory import model_state_bytes, stage_state_bytes
from distbelief.pipeline.split import split_model
from distbelief.sharding import tensor_specs


def test_five_copies_of_each_parameter():
    layer = nn.Linear(3, 2)  # 8 float32 values
    assert stage_state_bytes(layer.parameters()) == 5 * 8 * 4
    assert model_state_bytes(layer.parameters()) == 5 * 8 * 4
    assert model_state_bytes(tensor_specs(layer.double().named_parameters())) == 5 * 8 * 8


def test_halving_a_wide_mlp_nearly_halves_each_stages_state():
    def build() -> nn.Module:
        return build_model("wide-mlp", (3, 32, 32), 10)

    # Sizes only: the meta device holds no storage for the 19 million parameters.
    model = build_on_meta(build, seed=0)
    layers = pipeline_layers(model)
    split = split_model(build, 2, seed=0)
    whole = model_state_bytes(tensor_specs(model.named_parameters()))
    stages = [
        stage_state_bytes(p for _, layer in layers[start:stop] for p in layer.parameters())
        for start, stop in itertools.pairwise(split.bounds)
    ]
    assert sum(stages) == whole
    assert max(stages) <= 0.6 * whole
