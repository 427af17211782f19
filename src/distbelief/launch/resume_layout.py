"""Whether a resumed run's shard checkpoints hold the model its config.json names, checked
before anything starts or the run folder changes: config.json edited, or another run's
checkpoints copied in, would otherwise be found only by a process of the started job, after
the launcher had rewritten the folder's config and records.

What the shards must hold comes from the model built on the meta device (its layout only),
grouped as the job's processes group it: each parameter group's tensors (the whole model's,
each partition's of a model-parallel job in its group's folder, a click model's dense layers)
and a click model's row tables, by name and row width (not their rows, which grow; every
table's rows are float32); and each shard's tensor file and row chunk files, by the names,
dtypes and shapes their headers list, what the shard would restore. The shards restore from
the run's checkpoints, or for Sandblaster from the folder its coordinator's last committed
checkpoint names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from distbelief.config import CLICK_MODELS, table_names
from distbelief.coordinator.checkpoint import restore_folder
from distbelief.errors import CheckpointError, ConfigFieldError
from distbelief.launch.cluster import CHECKPOINT_DIR
from distbelief.launch.resume import checkpoint_folders
from distbelief.launch.rundir import run_dir_path
from distbelief.server.checkpoint_meta import (
    meta_path,
    read_meta,
    rows_meta_path,
    saved_row_tables,
    saved_specs,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from distbelief.config import JobConfig
    from distbelief.server.checkpoint_meta import SavedRowTable
    from distbelief.sharding import TensorSpec


def check_resumed_layout(config: JobConfig) -> None:
    """Refuse to resume the run in ``config.reporting.out_dir`` if its shards' checkpoints are
    not those of the model its config.json names: a click model's row tables first (a table
    the model lacks, or rows of another width), then every parameter group's tensors (the
    first that differs; then the tensors each shard's file holds, of its slices and its server
    optimizer's state), and a group the job does not use. Reads the checkpoints' JSON and
    their tensor and row chunk files' headers only (their digests are
    ``resume.check_checkpoints``'); changes nothing.

    Raises:
        CheckpointError: the first difference, naming the file.
    """
    run_dir = run_dir_path(config.reporting.out_dir)
    directory = run_dir / CHECKPOINT_DIR
    try:
        if config.optimizer.algorithm == "sandblaster":
            committed = restore_folder(directory)
            if committed is None:
                return  # no committed iteration: the shards start afresh
            directory = Path(committed)
        groups, tables = _expected_layout(config)
        _check_tables(directory, config, tables)
        _check_groups(directory, config, groups)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {run_dir}: cannot resume: {e}") from e


EVERY_MODEL_HAS_MORE_PARAMETERS = 1024
"""Fewer elements than the largest dtype group of every whole model the launcher builds has
(the smallest, dlrm's dense layers for MovieLens's two tables and no dense feature at
``--embedding-dim 1``, has 2,241; ``tests/unit/test_shard_bound.py`` checks each): a
whole-model job with at most this many shards needs no model built to know every shard gets
parameters."""


def check_every_shard_gets_parameters(groups: Iterable[Iterable[int]], num_shards: int) -> None:
    """Refuses more shards than some parameter group can give each one an element: the shards
    cut every group evenly (a model-parallel job's each partition's across all of them), so
    past its largest dtype group's element count a shard would hold none of that group, and
    serve it nothing. ``groups``: per parameter group, the element count of each of its dtype
    groups.

    Raises:
        ConfigFieldError: field ``cluster.num_shards`` (``--shards``).
    """
    bounds = [max(sizes) for sizes in map(list, groups) if sizes]
    if not bounds or num_shards <= min(bounds):
        return
    holder = "model" if len(bounds) == 1 else "smallest partition"
    raise ConfigFieldError(
        "cluster.num_shards",
        f"must be at most {min(bounds)}, the parameters of this run's {holder}: more shards "
        f"would hold none, got {num_shards}",
    )


def check_shards_fit_model(config: JobConfig) -> None:
    """``check_every_shard_gets_parameters`` for a job about to start, its model built on the
    meta device (a model-parallel job's partitions with its split points, when it has them).
    A whole-model job with at most ``EVERY_MODEL_HAS_MORE_PARAMETERS`` shards builds nothing.

    Raises:
        ConfigFieldError: field ``cluster.num_shards``.
    """
    num_shards = config.cluster.num_shards
    if config.pipeline.num_partitions == 1 and num_shards <= EVERY_MODEL_HAS_MORE_PARAMETERS:
        return
    check_every_shard_gets_parameters(model_group_sizes(config), num_shards)


def model_group_sizes(config: JobConfig) -> list[list[int]]:
    """Per parameter group the job's shards hold (the whole model's, or each partition's), the
    element count of each of its dtypes (a click model's dense layers; its row tables are not
    cut by the shard count)."""
    groups, _ = _expected_layout(config)
    sizes: list[list[int]] = []
    for _, specs in groups.values():
        by_dtype: dict[str, int] = {}
        for spec in specs:
            by_dtype[str(spec.dtype)] = by_dtype.get(str(spec.dtype), 0) + spec.numel
        sizes.append(list(by_dtype.values()))
    return sizes


def _expected_layout(
    config: JobConfig,
) -> tuple[dict[str, tuple[str, list[TensorSpec]]], dict[str, tuple[int, int]]]:
    """What the job's shards hold for its model: by parameter group, what holds it (in words)
    and its tensors' specs; and a click model's tables' rows and row widths. Sizes only: the
    shape of the test split (the smaller) and the model on the meta device."""
    import torch  # a resume only

    from distbelief.data import load_job_dataset
    from distbelief.sharding import tensor_specs

    test_set = load_job_dataset(config.data, "test")
    name = config.model.name
    shapes: dict[str, tuple[int, int]] = {}
    with torch.device("meta"):
        if name in CLICK_MODELS:
            from distbelief.embeddings.modules import swap_embeddings
            from distbelief.wire.group_names import DEFAULT_GROUP
            from distbelief.worker.ctr import build_ctr_replica

            model = build_ctr_replica(config, test_set)
            tables = swap_embeddings(model, table_names(config.embeddings.tables))
            shapes = {t: (m.num_embeddings, m.embedding_dim) for t, m in tables.items()}
            groups = [(DEFAULT_GROUP, list(model.named_parameters()))]
        else:
            from distbelief.models import build_model
            from distbelief.pipeline.job import parameter_groups

            shape, classes = test_set.input_shape, test_set.num_classes
            groups = parameter_groups(config, build_model(name, shape, classes), shape, classes)
    if len(groups) == 1:
        return {groups[0][0]: (repr(name), tensor_specs(groups[0][1]))}, shapes
    points = list(config.pipeline.split_points or ())
    return {
        group: (f"partition {stage} of {name!r} split at {points}", tensor_specs(named))
        for stage, (group, named) in enumerate(groups)
    }, shapes


def _check_tables(directory: Path, config: JobConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """Every shard's row tables are tables of the model, of its row widths (a table not saved
    yet is made empty, as a shard makes it), of its rows and row optimizer, and every chunk
    file's header lists what the shard restores (``check_row_chunks``)."""
    from distbelief.server.row_chunk_layout import check_row_chunks

    for shard_id in range(config.cluster.num_shards):
        saved = saved_row_tables(directory, shard_id) or {}
        for table, held in saved.items():
            _check_row_table(
                rows_meta_path(directory, shard_id), shard_id, config, table, held, shapes
            )
        check_row_chunks(directory, shard_id)


def _check_row_table(
    path: Path,
    shard_id: int,
    config: JobConfig,
    table: str,
    held: SavedRowTable,
    shapes: dict[str, tuple[int, int]],
) -> None:
    """Row table ``table`` of shard ``shard_id``'s checkpoint (``path``) is one of the model's,
    of its row width, of the job's row optimizer, and was made for as many rows as the job's
    table has (a MovieLens file that gained a larger id since sizes it anew): the shard, or a
    worker, would refuse it once started, failing the job."""
    from distbelief.server.row_optimizers import flag_name_of

    if table not in shapes or shapes[table][1] != held.dim:
        difference = (
            f"table {table!r} is not one of the model's tables on the shards"
            if table not in shapes
            else f"table {table!r} holds rows of {held.dim} values, the model's of "
            f"{shapes[table][1]}"
        )
        raise CheckpointError(
            f"{path} holds another model's tables than {config.model.name!r} (its "
            f"config.json's): {difference}"
        )
    row_optimizer = config.embeddings.row_optimizer
    if flag_name_of(held.optimizer) != row_optimizer:
        raise CheckpointError(
            f"{path}: shard {shard_id} would not restore it: table {table!r} holds the rows of "
            f"--row-optimizer {flag_name_of(held.optimizer)}, the job's (its config.json's) is "
            f"{row_optimizer}"
        )
    rows = shapes[table][0]
    if held.num_embeddings is not None and held.num_embeddings != rows:
        raise CheckpointError(
            f"{path}: table {table!r} was made for {held.num_embeddings} rows, the job's is of "
            f"{rows} (sized by {_what_sizes_the_tables(config)}): resume with the data and "
            "settings the run trained on"
        )


def _what_sizes_the_tables(config: JobConfig) -> str:
    if config.data.name == "movielens":
        return f"the ratings in --data-dir {config.data.data_dir}"
    return "--table-size, in its config.json"


def _check_groups(
    directory: Path, config: JobConfig, groups: dict[str, tuple[str, list[TensorSpec]]]
) -> None:
    """Every shard's checkpoint of each parameter group holds the group's tensors, its tensor
    file what the shard restores (their names, dtypes and shapes: its header), and no folder
    holds one of a group the job does not use."""
    from distbelief.server.checkpoint import check_tensor_file
    from distbelief.server.groups import group_dir
    from distbelief.server.optimizers import server_optimizer_from_config
    from distbelief.sharding import describe_mismatch, specs_from_json

    optimizer_factory = server_optimizer_from_config(config.server)
    folders = {group_dir(directory, group): group for group in groups}
    for folder in checkpoint_folders(directory, config.pipeline.num_partitions):
        group = folders.get(folder)
        for shard_id in range(config.cluster.num_shards):
            meta = read_meta(folder, shard_id)
            if meta is None:
                continue
            path = meta_path(folder, shard_id)
            if group is None:
                partitions = config.pipeline.num_partitions
                raise CheckpointError(
                    f"{path} holds a parameter group that {config.model.name!r} in "
                    f"{partitions} partition{'s' if partitions > 1 else ''} (its "
                    "config.json's) does not use"
                )
            saved = saved_specs(meta)
            if saved is None:
                continue
            try:
                theirs = specs_from_json(saved)
            except ValueError as e:
                raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from e
            holder, ours = groups[group]
            if theirs != ours:
                raise CheckpointError(
                    f"{path} holds another model's parameters than {holder} (its "
                    f"config.json's): {describe_mismatch(theirs, ours)}"
                )
            check_tensor_file(folder, shard_id, optimizer_factory)
