"""The launcher's split of a model-parallel job: planned once, written into the config, and
within ``--max-stage-bytes``: when the split balancing measured time would put more bytes on a
stage than the budget allows, the split balancing bytes is taken if it fits, and named if not."""

from __future__ import annotations

import pytest

from distbelief.config import JobConfig
from distbelief.errors import ConfigFieldError
from distbelief.launch.job_plan import plan_partitions
from distbelief.pipeline import job
from distbelief.pipeline.split import StageSplit

WIDE_MLP_LAYERS = 10
"""Flatten, then 4 x (Linear, ReLU), then the last Linear."""


def _lopsided_when_measured(monkeypatch) -> None:
    """Measured time (noisy on a busy machine) picking the cut after the third big layer."""
    original = job.job_split

    def job_split(config, input_shape, num_classes, *, measure=False):
        if not measure:
            return original(config, input_shape, num_classes)
        costs = (1.0,) * WIDE_MLP_LAYERS
        return StageSplit(bounds=(0, 6, WIDE_MLP_LAYERS), layer_costs=costs, basis="time")

    monkeypatch.setattr(job, "job_split", job_split)


def _config(budget: int | None) -> JobConfig:
    return JobConfig.from_fields(
        {
            "model.name": "wide-mlp",
            "pipeline.num_partitions": 2,
            "pipeline.max_stage_bytes": budget,
        }
    )


def test_a_measured_split_over_the_budget_gives_way_to_one_by_bytes(monkeypatch):
    _lopsided_when_measured(monkeypatch)
    config, plan = plan_partitions(_config(200_000_000))
    assert (plan["basis"], plan["split_points"]) == ("bytes", [4])
    assert config.pipeline.split_points == (4,)
    assert max(plan["stage_state_bytes"]) <= 200_000_000


def test_without_a_budget_the_measured_split_stands(monkeypatch):
    _lopsided_when_measured(monkeypatch)
    _, plan = plan_partitions(_config(None))
    assert (plan["basis"], plan["split_points"]) == ("time", [6])


def test_a_budget_no_split_fits_is_refused_naming_the_least_it_would_take(monkeypatch):
    """The need named is the split by bytes' largest stage (the measured split's is 209838080):
    a budget of that much is taken."""
    _lopsided_when_measured(monkeypatch)
    with pytest.raises(ConfigFieldError, match="partition 1 of 2 needs 168263880 bytes") as e:
        plan_partitions(_config(150_000_000))
    assert e.value.field == "pipeline.max_stage_bytes"
    _, plan = plan_partitions(_config(168_263_880))
    assert (plan["basis"], max(plan["stage_state_bytes"])) == ("bytes", 168_263_880)


def test_a_budget_below_one_layers_need_says_no_split_fits_it():
    """More partitions could not help (the advice given was "use more partitions"): a split
    does not cut a layer, and mlp's layers.1 alone needs 5248000 bytes."""
    config = JobConfig.from_fields(
        {"model.name": "mlp", "pipeline.num_partitions": 3, "pipeline.max_stage_bytes": 5_247_999}
    )
    with pytest.raises(ConfigFieldError) as refused:
        plan_partitions(config)
    assert str(refused.value).endswith(
        "needs 5248000 bytes for its parameters and optimizer state: no split fits it, since "
        "layer layers.1 alone needs 5248000 bytes (a split does not cut a layer)"
    )
    config = config.with_fields(
        {
            "pipeline.num_partitions": 2,
            "pipeline.split_points": (4,),
            "pipeline.max_stage_bytes": 5_300_000,
        }
    )
    with pytest.raises(ConfigFieldError, match="give other --split-points, or use more partitions"):
        plan_partitions(config)
