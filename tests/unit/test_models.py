"""Unit tests for distbelief.models: shapes, parameter counts and argument checks."""

from __future__ import annotations

import pytest
import torch

from distbelief.config import CLICK_MODELS, MODEL_NAMES
from distbelief.models import MLP, AlexNet, LeNet, WideCNN, WideMLP, build_model

INPUT_SHAPES = [(1, 32, 32), (3, 32, 32), (1, 28, 28)]


@pytest.mark.parametrize("name", [m for m in MODEL_NAMES if m not in CLICK_MODELS])
@pytest.mark.parametrize("input_shape", INPUT_SHAPES)
def test_forward_gives_one_logit_per_class(name, input_shape):
    torch.manual_seed(0)
    model = build_model(name, input_shape, num_classes=10)
    logits = model(torch.randn(4, *input_shape))
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()


def test_build_model_returns_named_classes():
    assert isinstance(build_model("lenet", (3, 32, 32), 10), LeNet)
    assert isinstance(build_model("alexnet", (3, 32, 32), 10), AlexNet)
    assert isinstance(build_model("mlp", (3, 32, 32), 10), MLP)
    assert isinstance(build_model("wide-mlp", (1, 8, 8), 10), WideMLP)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet_parameter_count_matches_tutorial():
    assert _num_params(LeNet((3, 32, 32), 10)) == 62006


def test_mlp_layer_sizes():
    model = MLP((1, 28, 28), 10)
    expected = (784 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10)
    assert _num_params(model) == expected
    assert _num_params(MLP((1, 8, 8), 3, hidden_sizes=(5,))) == (64 * 5 + 5) + (5 * 3 + 3)


def test_wide_mlp_has_four_hidden_layers_of_width_2048():
    model = WideMLP((1, 28, 28), 10)
    expected = (784 * 2048 + 2048) + 3 * (2048 * 2048 + 2048) + (2048 * 10 + 10)
    assert _num_params(model) == expected


def test_alexnet_feature_size_follows_input():
    # 32x32 -> 16 (stride 2) -> 8 -> 4 -> 2 after the pools: 256 * 2 * 2 features.
    assert AlexNet((3, 32, 32), 10).classifier[1].in_features == 1024
    assert AlexNet((1, 28, 28), 10).classifier[1].in_features == 256


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match=r"resnet.*lenet.*alexnet.*mlp.*wide-mlp"):
        build_model("resnet", (3, 32, 32), 10)


@pytest.mark.parametrize(
    ("input_shape", "num_classes"), [((3, 32), 10), ((3, 0, 32), 10), ((3, 32, 32), 0)]
)
def test_bad_model_arguments_raise_value_error(input_shape, num_classes):
    with pytest.raises(ValueError):
        build_model("lenet", input_shape, num_classes)


@pytest.mark.parametrize("model_class", [LeNet, AlexNet, MLP, WideMLP, WideCNN])
@pytest.mark.parametrize(
    ("input_shape", "num_classes", "named"),
    [
        (None, 10, "input_shape"),
        ((1, "28", 28), 10, "input_shape"),
        ((1, 28, 28), "10", "num_classes"),
        ((1, 28, 28), None, "num_classes"),
        ((1, 28, 28), 2.5, "num_classes"),
    ],
)
def test_a_model_class_names_a_bad_argument_as_build_model_does(
    model_class, input_shape, num_classes, named
):
    with pytest.raises(ValueError, match=rf"^{named} must be "):
        model_class(input_shape, num_classes)


def test_too_small_input_raises_value_error():
    with pytest.raises(ValueError, match="too small"):
        LeNet((1, 8, 8), 10)


@pytest.mark.parametrize("hidden_sizes", [5, (0,), ("64",), (2.5,)])
def test_mlp_names_bad_hidden_sizes(hidden_sizes):
    with pytest.raises(ValueError, match=r"^hidden_sizes must all be integers >= 1"):
        MLP((1, 28, 28), 10, hidden_sizes=hidden_sizes)
