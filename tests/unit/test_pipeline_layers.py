"""Pipeline layers: a model as an ordered list of layers, and building one partition of it with
exactly the values of a full build, one module's storage at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distbelief.models import build_model
from distbelief.pipeline.layers import StageModule, build_stage, check_bounds, pipeline_layers
from distbelief.pipeline.split import split_model

# Small inputs keep these fast; AlexNet needs at least 15x15, LeNet 16x16.
MODELS = {"lenet": (1, 16, 16), "mlp": (1, 8, 8), "alexnet": (3, 32, 32), "wide-cnn": (3, 8, 8)}


def _builder(name: str):
    return lambda: build_model(name, MODELS[name], 10)


def test_lenet_layers_are_named_as_in_the_model():
    names = [name for name, _ in pipeline_layers(_builder("lenet")())]
    assert names[:2] == ["features.0", "features.1"]
    assert names[6:8] == ["features.6", "classifier.0"]
    assert names[-1] == "classifier.4"
    assert len(names) == 12


@pytest.mark.parametrize("name", list(MODELS))
def test_composing_the_layers_is_the_forward(name):
    torch.manual_seed(0)
    model = _builder(name)().eval()  # eval: AlexNet's dropout would differ between the runs
    x = torch.randn(2, *MODELS[name])
    with torch.no_grad():
        expected = model(x)
        out = x
        for _, layer in pipeline_layers(model):
            out = layer(out)
    assert torch.equal(out, expected)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class _Ordered(nn.Module):
    pipeline_order = ("head", "body")

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), _Residual())
        self.head = nn.Linear(4, 4)
        self.unused = nn.ReLU()


def test_pipeline_order_sets_the_order_and_other_modules_are_single_layers():
    names = [name for name, _ in pipeline_layers(_Ordered())]
    assert names == ["head", "body.0", "body.1"]


def test_a_model_without_a_sequential_forward_cannot_be_split():
    with pytest.raises(ValueError, match=r"_Residual cannot be split.*nn.Sequential"):
        pipeline_layers(_Residual())


def test_pipeline_order_naming_a_missing_child_is_rejected():
    class Broken(_Ordered):
        pipeline_order = ("head", "tail")

    with pytest.raises(ValueError, match=r"Broken.pipeline_order names \['tail'\]"):
        pipeline_layers(Broken())


def test_pipeline_order_leaving_out_parameters_is_rejected():
    class Partial(_Ordered):
        pipeline_order = ("body",)

    with pytest.raises(ValueError, match=r"leaves out \['head'\], which have parameters"):
        pipeline_layers(Partial())


def test_a_container_with_its_own_parameters_is_rejected():
    model = nn.Sequential(nn.Linear(2, 2))
    model.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="outside its layers"):
        pipeline_layers(model)


@pytest.mark.parametrize(
    ("bounds", "problem"),
    [((0, 3), "from 0 to"), ((0, 2, 2, 6), "strictly increasing"), ((6,), "at least two")],
)
def test_bad_bounds_are_named(bounds, problem):
    with pytest.raises(ValueError, match=rf"bounds \[.*\] must.*{problem}"):
        check_bounds(bounds, 6)


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_each_partition_gets_exactly_the_full_builds_values(name, num_stages):
    build = _builder(name)
    torch.manual_seed(7)
    reference = dict(build().named_parameters())
    rng_after_full_build = torch.get_rng_state()
    bounds = split_model(build, num_stages, seed=7).bounds

    covered = set()
    for stage in range(num_stages):
        model, stage_module = build_stage(build, bounds, stage, seed=7)
        names = {id(p): n for n, p in model.named_parameters()}
        own = {names[id(p)] for p in stage_module.parameters()}
        for param in stage_module.parameters():
            assert torch.equal(param, reference[names[id(param)]]), names[id(param)]
        # The rest of the model has no storage, and the RNG is where a full build leaves it.
        assert all(p.is_meta for n, p in model.named_parameters() if n not in own)
        assert torch.equal(torch.get_rng_state(), rng_after_full_build)
        assert not covered & own
        covered |= own
    assert covered == set(reference)


_live_layers: list[nn.Linear] = []
_peak_cpu_params: list[int] = []


class _ProbeLinear(nn.Linear):
    """Records, whenever one of them is initialised, how many probe parameters hold storage."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        _peak_cpu_params.append(
            sum(p.numel() for layer in _live_layers for p in layer.parameters() if not p.is_meta)
        )


def test_building_a_partition_holds_at_most_one_other_module():
    def build() -> nn.Module:
        _live_layers.clear()
        layers = [_ProbeLinear(10, 10) for _ in range(6)]
        _live_layers.extend(layers)
        return nn.Sequential(*layers)

    _peak_cpu_params.clear()
    _, stage_module = build_stage(build, (0, 2, 4, 6), 1, seed=0)
    per_layer = 10 * 10 + 10
    assert max(_peak_cpu_params) <= 3 * per_layer  # two of this partition's layers + one
    assert sum(p.numel() for p in stage_module.parameters()) == 2 * per_layer


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_a_module_that_cannot_reinitialise_its_parameters_is_refused():
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 3), _Scale())

    with pytest.raises(ValueError, match=r"1 \(_Scale\) has parameters.*no reset_parameters"):
        build_stage(build, (0, 1, 2), 0, seed=0)


def test_a_stage_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"stage 2 is not in \[0, 2\)"):
        build_stage(_builder("mlp"), (0, 2, 6), 2, seed=0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda b: build_stage(b(), (0, 2, 6), 0, seed=0), TypeError, "build must be a function"),
        (lambda b: build_stage(b, (0, 2, 6), 1.0, seed=0), TypeError, "stage must be an int"),
        (lambda b: build_stage(b, (0, 2, 6), "1", seed=0), TypeError, "stage must be an int"),
        (lambda b: build_stage(b, (0, 2, 6), 0, seed=1.5), TypeError, "seed must be an int"),
        (lambda b: build_stage(b, 6, 0, seed=0), TypeError, "bounds must be a sequence"),
        (lambda b: split_model(b(), 2, seed=0), TypeError, "build must be a function"),
        (lambda b: split_model(b, 2, seed=None), TypeError, "seed must be an int"),
        (lambda b: split_model(b, 2.0, seed=0), ValueError, "num_stages must be an integer"),
        (lambda b: split_model(b, True, seed=0), ValueError, "num_stages must be an integer"),
        (
            lambda b: split_model(b, 2, seed=0, sample_input=[[0.0] * 64]),
            TypeError,
            "sample_input must be a tensor",
        ),
    ],
)
def test_arguments_of_the_wrong_type_are_named(call, error, message):
    with pytest.raises(error, match=rf"^{message}"):
        call(_builder("mlp"))


def test_stage_module_parameters_are_its_layers_parameters():
    first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    stage = StageModule([first, nn.ReLU(), second])
    assert [id(p) for p in stage.parameters()] == [
        id(p) for p in (*first.parameters(), *second.parameters())
    ]
    with pytest.raises(ValueError, match="at least one layer"):
        StageModule([])


def test_a_partition_starting_in_place_leaves_its_input_alone():
    stage = StageModule([nn.ReLU(inplace=True), nn.Linear(3, 2)])
    received = torch.tensor([[-1.0, 2.0, -3.0]])
    x = received.detach().requires_grad_()
    stage(x).sum().backward()
    assert torch.equal(received, torch.tensor([[-1.0, 2.0, -3.0]]))
    assert x.grad is not None
