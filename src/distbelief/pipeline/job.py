"""A job's partitioning: the split every process of a model-parallel job agrees on (the
config's split points, else measured or balanced by bytes), what a replica's stages check
with each other, each partition's parameters by their names in the whole model, its parameter
group on the shards (every group of a job's model: ``parameter_groups``), and the memory
budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from distbelief.errors import ConfigFieldError
from distbelief.models import build_model
from distbelief.pipeline.layers import StageModule, pipeline_layers
from distbelief.pipeline.memory import stage_state_bytes
from distbelief.pipeline.split import StageSplit, split_model
from distbelief.pipeline.stage_protocol import NUM_MICRO_KEY
from distbelief.wire.group_names import DEFAULT_GROUP

if TYPE_CHECKING:
    from distbelief.config import JobConfig


def model_builder(config: JobConfig, input_shape, num_classes: int) -> Callable[[], nn.Module]:
    """Builds the job's whole model (unseeded: the caller seeds)."""
    return lambda: build_model(config.model.name, tuple(input_shape), num_classes)


def stage_group(stage: int) -> str:
    """The parameter group on the shards that holds partition ``stage``'s parameters."""
    return f"stage{stage}"


def job_split(
    config: JobConfig, input_shape, num_classes: int, *, measure: bool = False
) -> StageSplit:
    """The job's split: its ``split_points``; else, with ``measure``, the partitions balanced
    by measured compute time on a batch of the job's size (what ``train`` does, once, before
    any stage starts); else balanced by parameter bytes (every process computes the same).

    Raises:
        ConfigFieldError: the split points do not fit the model, or it cannot be split.
    """
    build = model_builder(config, input_shape, num_classes)
    sample = None
    if measure and config.pipeline.split_points is None:
        generator = torch.Generator().manual_seed(config.model.seed)
        batch = config.optimizer.minibatch_size
        sample = torch.randn(batch, *input_shape, generator=generator)
    try:
        return split_model(
            build,
            config.pipeline.num_partitions,
            seed=config.model.seed,
            points=config.pipeline.split_points,
            sample_input=sample,
        )
    except ValueError as e:
        field = "split_points" if config.pipeline.split_points else "num_partitions"
        raise ConfigFieldError(f"pipeline.{field}", str(e)) from e


def stage_plan(config: JobConfig, rank: int, split: StageSplit) -> dict[str, object]:
    """What the stages of replica ``rank`` must agree on, by config field (``rank``: the
    flag), for the stages' hello to compare: the model and where it is cut, the micro-batches
    and their schedule, and what decides each step's batch (stage 0 reads its inputs, the last
    stage its labels). A stage given another value would train another model, without a word.
    """
    optimizer = config.optimizer
    return {
        "model.name": config.model.name,
        "pipeline.split_points": split.bounds[1:-1],
        NUM_MICRO_KEY: config.pipeline.num_micro_batches,
        "pipeline.schedule": config.pipeline.schedule,
        "data.name": config.data.name,
        "model.seed": config.model.seed,
        "optimizer.batch_size": optimizer.minibatch_size,
        "optimizer.steps": optimizer.steps,
        "optimizer.epochs": None if optimizer.steps is not None else optimizer.num_epochs,
        "cluster.num_workers": config.cluster.num_workers,
        "rank": rank,
    }


def partition_parameters(
    full_model: nn.Module, stage_module: StageModule
) -> list[tuple[str, nn.Parameter]]:
    """Partition ``stage_module``'s parameters with their names in the whole model, in order."""
    names = {id(p): name for name, p in full_model.named_parameters()}
    return [(names[id(p)], p) for p in stage_module.parameters()]


def partition_names(model: nn.Module, bounds, stage: int) -> list[str]:
    """Names (in the whole model) of partition ``stage``'s parameters, in order."""
    layers = pipeline_layers(model)[bounds[stage] : bounds[stage + 1]]
    return [f"{prefix}.{name}" for prefix, layer in layers for name, _ in layer.named_parameters()]


def parameter_groups(
    config: JobConfig, model: nn.Module, input_shape, num_classes: int
) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """(group on the shards, its named parameters of ``model``, the job's whole model): the
    whole model in the default group, or each partition of a model-parallel job in its own
    (``stage_group``), in stage order."""
    named = list(model.named_parameters())
    if config.pipeline.num_partitions == 1:
        return [(DEFAULT_GROUP, named)]
    split = job_split(config, input_shape, num_classes)
    by_name = dict(named)
    return [
        (stage_group(stage), [(n, by_name[n]) for n in partition_names(model, split.bounds, stage)])
        for stage in range(split.num_stages)
    ]


def check_stage_budget(
    config: JobConfig, stage: int, parameters, *, advice: str = "use more partitions"
) -> int:
    """A stage's bytes of parameters and optimizer state; ValueError naming
    ``--max-stage-bytes`` when they exceed the job's budget, ending with ``advice`` (what
    would make it fit)."""
    needed = stage_state_bytes(list(parameters))
    budget = config.pipeline.max_stage_bytes
    if budget is not None and needed > budget:
        raise ConfigFieldError(
            "pipeline.max_stage_bytes",
            f"is {budget}, but partition {stage} of {config.pipeline.num_partitions} needs "
            f"{needed} bytes for its parameters and optimizer state: {advice}",
        )
    return needed


def budget_advice(config: JobConfig, layers: list[tuple[str, nn.Module]]) -> str:
    """What would make a stage fit ``--max-stage-bytes``: more partitions (or other split
    points, where they were given); nothing, where one layer alone needs more, since no split
    cuts a layer."""
    name, least = max(
        ((name, stage_state_bytes(layer.parameters())) for name, layer in layers),
        key=lambda named: named[1],
    )
    budget = config.pipeline.max_stage_bytes
    if budget is not None and least > budget:
        return (
            f"no split fits it, since layer {name} alone needs {least} bytes (a split does not "
            "cut a layer)"
        )
    if config.pipeline.split_points is not None:
        return "give other --split-points, or use more partitions"
    return "use more partitions"
