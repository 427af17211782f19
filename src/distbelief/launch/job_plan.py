"""What the launcher decides and checks before a job's processes start: the steps each worker
will run (counting the training set where asked), that the data files and batch fit, and a
model-parallel job's split (against the stage memory budget). It starts nothing and writes
nothing; torch and the data are imported only where a check needs them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from distbelief.config import PORTIONS_PER_WORKER, JobConfig
from distbelief.data.files import FILE_DATASETS, FIXED_TRAIN_EXAMPLES
from distbelief.errors import ConfigFieldError
from distbelief.launch.summary import SUMMARY_FILE

logger = logging.getLogger(__name__)


def counts_examples(config: JobConfig) -> bool:
    """Whether planning the job's steps reads its training set (Sandblaster's batch, epochs)."""
    return config.optimizer.algorithm == "sandblaster" or config.optimizer.steps is None


def planned_steps(config: JobConfig) -> list[int]:
    """Steps each worker will run (Sandblaster: the coordinator's iterations); ConfigFieldError
    if the warmstart outlasts worker 0's pushes, or Sandblaster's portions do not fit its
    batch."""
    if config.optimizer.algorithm == "sandblaster":
        return [_sandblaster_iterations(config)]
    if config.optimizer.steps is not None:
        steps = [config.optimizer.steps] * config.cluster.num_workers
        if config.data.name in FIXED_TRAIN_EXAMPLES:
            _check_batch_fits(config, FIXED_TRAIN_EXAMPLES[config.data.name])
    else:
        from distbelief.data import load_job_dataset, worker_indices  # torch: only when counting

        train_set = load_job_dataset(config.data, "train")
        _check_batch_fits(config, len(train_set))
        steps = [
            len(worker_indices(len(train_set), rank, config.cluster.num_workers))
            // config.optimizer.minibatch_size
            * config.optimizer.num_epochs
            for rank in range(config.cluster.num_workers)
        ]
    pushes_of_worker0 = -(-steps[0] // config.optimizer.n_push)  # a last partial window is flushed
    warmstart_steps = config.optimizer.warmstart_steps
    if warmstart_steps > pushes_of_worker0:
        raise ConfigFieldError(
            "optimizer.warmstart_steps",
            f"must be <= the {pushes_of_worker0} pushes worker 0 will make (else the other "
            f"workers never start), got {warmstart_steps}",
        )
    return steps


def _check_batch_fits(config: JobConfig, train_examples: int) -> None:
    """Refuses a batch larger than the smallest worker's share of ``train_examples`` (that
    worker would never make a step: a pass drops its last, partial batch)."""
    share = train_examples // config.cluster.num_workers
    batch = config.optimizer.minibatch_size
    if share == 0:  # no batch size would do: the workers are too many
        raise ConfigFieldError(
            "cluster.num_workers",
            f"must be <= the {train_examples} training examples (each worker trains on a "
            f"share of them), got {config.cluster.num_workers}",
        )
    if batch > share:
        raise ConfigFieldError(
            "optimizer.batch_size",
            f"must be <= the {share} training examples of each of the "
            f"{config.cluster.num_workers} workers, got {batch}",
        )


def check_data(config: JobConfig, *, counted: bool) -> None:
    """Refuses a corrupt data file, an empty split or a MovieLens id too large for the model's
    tables before any process would load it (the training split is read already if counting
    its examples planned the steps), and a batch larger than a worker's share of the training
    split that planning the steps did not count."""
    if config.data.name not in FILE_DATASETS:
        return  # generated or bundled: nothing to read, and no torch to load for it
    from distbelief.data.loading import check_job_data

    splits = ("test",) if counted else ("train", "test")
    train_examples = check_job_data(
        config.data,
        splits,
        embedding_dim=config.model.embedding_dim,
        dense_tables=config.tables_left_dense(),
    )
    if train_examples is not None:
        _check_batch_fits(config, train_examples)


def _sandblaster_iterations(config: JobConfig) -> int:
    from distbelief.data import load_job_dataset  # torch: only when counting

    train_set = load_job_dataset(config.data, "train")
    batch_size = config.optimizer.batch_size
    if batch_size is not None and batch_size > len(train_set):
        raise ConfigFieldError(
            "optimizer.batch_size",
            f"must be <= the {len(train_set)} training examples, got {batch_size}",
        )
    batch = batch_size if batch_size is not None else len(train_set)
    portions = config.sandblaster.num_portions(config.cluster.num_workers)
    if portions > batch and config.sandblaster.portions is None and batch_size is not None:
        # The portions were not asked for: the batch asked for is what is too small.
        raise ConfigFieldError(
            "optimizer.batch_size",
            f"must be >= the {portions} portions it is cut into ({PORTIONS_PER_WORKER} per "
            f"worker unless --portions says otherwise), got {batch}",
        )
    if portions > batch:
        raise ConfigFieldError(
            "sandblaster.portions", f"must be <= the batch of {batch} examples, got {portions}"
        )
    return config.sandblaster.max_iterations


def plan_partitions(config: JobConfig, *, announce: bool = True) -> tuple[JobConfig, dict]:
    """A model-parallel job's split, decided once for every process (measured compute time
    unless the config gives split points) and checked against the stage memory budget; the
    config with the split points filled in, and the split's description for the summary.
    A whole-model job with a memory budget is checked against it too (as one partition)."""
    num_partitions = config.pipeline.num_partitions
    if num_partitions == 1 and config.pipeline.max_stage_bytes is None:
        return config, {}
    import torch  # only for a model-parallel job or a memory budget

    from distbelief.data import load_job_dataset
    from distbelief.pipeline.job import (
        budget_advice,
        check_stage_budget,
        job_split,
        model_builder,
        partition_names,
    )
    from distbelief.pipeline.layers import pipeline_layers
    from distbelief.pipeline.memory import stage_state_bytes

    train_set = load_job_dataset(config.data, "train")
    with torch.device("meta"):  # sizes only: no parameter is allocated
        model = model_builder(config, train_set.input_shape, train_set.num_classes)()
    advice = budget_advice(config, pipeline_layers(model))
    if num_partitions == 1:
        check_stage_budget(config, 0, model.parameters(), advice=advice)
        return config, {}
    parameters = dict(model.named_parameters())

    def partitions(split) -> list[list]:
        return [
            [parameters[name] for name in partition_names(model, split.bounds, stage)]
            for stage in range(split.num_stages)
        ]

    split = job_split(config, train_set.input_shape, train_set.num_classes, measure=True)
    budget = config.pipeline.max_stage_bytes
    if budget is not None and any(stage_state_bytes(p) > budget for p in partitions(split)):
        # Balanced time may cost a stage more bytes than the budget; balanced bytes may fit,
        # and if not, it is the split that needs the least: the refusal names its need.
        split = job_split(config, train_set.input_shape, train_set.num_classes)
    stages = partitions(split)
    stage_bytes = [stage_state_bytes(params) for params in stages]
    largest = stage_bytes.index(max(stage_bytes))
    check_stage_budget(config, largest, stages[largest], advice=advice)
    description = split.describe([name for name, _ in pipeline_layers(model)])
    if announce:
        logger.info("%s", description)
    points = list(split.bounds[1:-1])
    plan = {
        "split_points": points,
        "basis": split.basis,
        "stage_costs": list(split.stage_costs),
        "imbalance": split.imbalance,
        "stage_state_bytes": stage_bytes,
        "description": description,
    }
    return config.with_fields({"pipeline.split_points": points}), plan


def earlier_plan(run_dir: Path, plan: dict) -> dict:
    """A resumed model-parallel run's split as its first launch chose it: the split points
    are the config's, so the plan made again calls them given; the earlier summary.json's
    basis (measured time, say), costs and description are the truth, where it has them for
    the same points. The stage bytes are the ones computed now."""
    import json

    try:
        earlier = json.loads((run_dir / SUMMARY_FILE).read_text()).get("partitions")
    except (OSError, ValueError, AttributeError):
        return plan
    if not isinstance(earlier, dict) or earlier.get("split_points") != plan["split_points"]:
        return plan
    kept = ("basis", "stage_costs", "imbalance", "description")
    return {**plan, **{key: earlier[key] for key in kept if key in earlier}}
