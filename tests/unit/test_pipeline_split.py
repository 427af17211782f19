"""Pipeline splits: balanced contiguous partitions, user-given points, per-layer costs."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from distbelief.models import build_model
from distbelief.pipeline.layers import pipeline_layers
from distbelief.pipeline.split import (
    StageSplit,
    balanced_bounds,
    check_split_points,
    measure_layer_costs,
    parameter_bytes_costs,
    split_model,
)


def _mlp():
    return build_model("mlp", (1, 8, 8), 10)


def _largest_cost(costs, bounds) -> float:
    return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))


def _brute_force_best(costs, num_stages, has_parameters) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), num_stages - 1):
        bounds = (0, *cuts, len(costs))
        if all(any(has_parameters[a:b]) for a, b in itertools.pairwise(bounds)):
            best = min(best, _largest_cost(costs, bounds))
    return best


def test_balanced_bounds_on_simple_costs():
    assert balanced_bounds([1, 1, 1, 1], 2, [True] * 4) == (0, 2, 4)
    assert balanced_bounds([5, 1, 1, 1, 1, 1], 2, [True] * 6) == (0, 1, 6)
    assert balanced_bounds([3.0], 1, [True]) == (0, 1)


def test_every_partition_gets_a_layer_with_parameters():
    # The cheapest split by cost alone, (0, 2, 4), would leave the second partition nothing
    # to train.
    costs, has = [5.0, 5.0, 5.0, 5.0], [True, True, False, False]
    assert balanced_bounds(costs, 2, has) == (0, 1, 4)


@pytest.mark.parametrize("seed", range(20))
def test_balanced_bounds_matches_brute_force(seed):
    rng = random.Random(seed)
    num_layers = rng.randint(1, 8)
    costs = [rng.choice([0.0, rng.random() * 10]) for _ in range(num_layers)]
    has = [rng.random() < 0.6 for _ in range(num_layers)]
    has[rng.randrange(num_layers)] = True
    num_stages = rng.randint(1, sum(has))
    bounds = balanced_bounds(costs, num_stages, has)
    assert bounds[0] == 0 and bounds[-1] == num_layers and len(bounds) == num_stages + 1
    assert all(any(has[a:b]) for a, b in itertools.pairwise(bounds))
    assert _largest_cost(costs, bounds) == pytest.approx(_brute_force_best(costs, num_stages, has))


def test_more_partitions_than_layers_with_parameters_is_refused():
    with pytest.raises(ValueError, match=r"into 3 partitions: only 2 of the model's 4 layers"):
        balanced_bounds([1, 1, 1, 1], 3, [True, False, True, False])
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        balanced_bounds([1, 1], 0, [True, True])
    with pytest.raises(ValueError, match="has 1 entries for 2 layer costs"):
        balanced_bounds([1, 1], 1, [True])


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([3, 2], r"split points \[3, 2\] must be increasing"),
        ([2, 2], r"split points \[2, 2\] must be increasing"),
        ([4], r"split points \[4\] make 2 partitions, not 3"),
        ([0, 3], r"split points \[0, 3\] must lie between 1 and 5"),
        ([2, 6], r"split points \[2, 6\] must lie between 1 and 5"),
        ([1.5, 3], r"split points \[1.5, 3\] must be ints"),
        ([1, 3], r"split points \[1, 3\] leave partition 1 without parameters"),
    ],
)
def test_bad_split_points_are_named_as_given(points, message):
    has = [True, False, False, True, False, True]
    with pytest.raises(ValueError, match=message):
        check_split_points(points, 6, 3, has)


def test_good_split_points_give_bounds():
    has = [True, False, False, True, False, True]
    assert check_split_points([2, 4], 6, 3, has) == (0, 2, 4, 6)
    assert check_split_points([], 6, 1, has) == (0, 6)


def test_stage_split_figures_and_description():
    split = StageSplit(bounds=(0, 2, 3, 5), layer_costs=(2.0, 2.0, 3.0, 2.0, 1.0), basis="time")
    assert split.num_stages == 3
    assert split.stage_costs == (4.0, 3.0, 3.0)
    assert split.imbalance == pytest.approx(4.0 / (10.0 / 3))
    names = ["a.0", "a.1", "b.0", "b.1", "b.2"]
    assert split.describe(names) == (
        "3 partitions by measured time: [a.0..a.1] 40% | [b.0] 30% | [b.1..b.2] 30% "
        "(imbalance 1.20)"
    )
    with pytest.raises(ValueError, match="layer_names has 2 names for 5 layers"):
        split.describe(names[:2])


def test_stage_split_checks_its_fields():
    with pytest.raises(ValueError, match="strictly increasing"):
        StageSplit(bounds=(0, 1, 1, 2), layer_costs=(1.0, 1.0), basis="bytes")
    with pytest.raises(ValueError, match="basis 'flops'"):
        StageSplit(bounds=(0, 2), layer_costs=(1.0, 1.0), basis="flops")


def test_parameter_bytes_costs_count_each_layers_parameters():
    layers = [("0", nn.Linear(3, 2)), ("1", nn.ReLU()), ("2", nn.Linear(2, 1).double())]
    assert parameter_bytes_costs(layers) == [8 * 4.0, 0.0, 3 * 8.0]


def test_split_by_bytes_balances_parameter_bytes():
    split = split_model(_mlp, 2, seed=0)
    assert split.basis == "bytes"
    # 64x256 (16640 values) alone outweighs 256x128 + 128x10 (34186 values) less than any
    # other cut does.
    assert split.bounds == (0, 2, 6)
    assert split.layer_costs[0] == 0.0
    names = [name for name, _ in pipeline_layers(_mlp())]
    assert split.describe(names).startswith("2 partitions by parameter bytes: [layers.0..layers.1]")


def test_split_at_given_points():
    split = split_model(_mlp, 3, seed=0, points=[3, 5])
    assert split.basis == "given"
    assert split.bounds == (0, 3, 5, 6)


def test_split_points_that_are_no_sequence_of_ints_are_named():
    with pytest.raises(ValueError, match=r"split points must be a sequence of ints, got points=3"):
        split_model(_mlp, 2, seed=0, points=3)
    # A bool is an int to Python, but no layer index (as seed and stage refuse bools).
    with pytest.raises(ValueError, match=r"split points \[True\] must be ints"):
        split_model(_mlp, 2, seed=0, points=[True])


def test_split_by_measured_time_leaves_the_rng_alone():
    sample = torch.randn(4, 1, 8, 8)
    state = torch.get_rng_state()
    split = split_model(_mlp, 2, seed=0, sample_input=sample)
    assert torch.equal(torch.get_rng_state(), state)
    assert split.basis == "time"
    assert len(split.layer_costs) == 6
    assert all(cost > 0 for cost in split.layer_costs)


@pytest.mark.parametrize(
    ("sample", "received"),
    [
        (torch.randn(4, 1, 8, 9), r"\[4, 1, 8, 9\] torch.float32"),  # another shape
        (torch.zeros(4, 1, 8, 8, dtype=torch.float64), r"\[4, 1, 8, 8\] torch.float64"),
    ],
    ids=["shape", "dtype"],
)
def test_a_sample_input_the_model_cannot_take_is_named(sample, received):
    """A sample_input of another shape or dtype than the model takes is a ValueError naming
    it and the layer that refused it (it was torch's RuntimeError from deep in the timing)."""
    expected = rf"sample_input {received} on cpu: layer \d+ \(.*\) cannot run"
    with pytest.raises(ValueError, match=expected):
        split_model(_mlp, 2, seed=0, sample_input=sample)


def test_measuring_passes_each_layer_its_input_even_in_place_ones():
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)
        )

    sample = torch.randn(2, 1, 8, 8)
    original = sample.clone()
    costs = measure_layer_costs(build, sample, seed=0, repeats=2)
    assert len(costs) == 4
    assert all(cost > 0 for cost in costs)
    assert torch.equal(sample, original)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        measure_layer_costs(build, sample, seed=0, repeats=0)
