"""Resuming a run folder: its config (sectioned, or flat as runs wrote it before the sections)
and its shard checkpoints, checked before any process starts, so a corrupt or missing file is
one clear error naming the file instead of a shard's traceback. A resumed run keeps its config,
but for the few fields that say how long it goes on and how it runs (``RESUMABLE_FIELDS``). The
check reads the files without torch: ``distbelief train`` runs it before it starts the
processes, and a refused resume costs no torch import."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from distbelief.config import JobConfig
from distbelief.coordinator.checkpoint import RECORD_FILE, TAG_PREFIX, read_record, restore_folder
from distbelief.coordinator.lbfgs import RESUMABLE_STOPS
from distbelief.errors import CheckpointError, ConfigFieldError
from distbelief.launch.cluster import CHECKPOINT_DIR
from distbelief.launch.flags import flag_of
from distbelief.launch.rundir import misplaced_run_entry, nothing_to_resume
from distbelief.server.checkpoint_meta import (
    LAUNCHED_PARTITIONER,
    check_rows_meta,
    meta_path,
    read_checked_meta,
    read_meta,
    rows_meta_path,
    saved_partitioner,
)

RESUMABLE_FIELDS = (
    "sandblaster.max_iterations",
    "sandblaster.max_evaluations",
    "cluster.threads_per_worker",
    "cluster.device",
    "cluster.shard_hosts",
    "cluster.worker_host",
    "cluster.transport",
    "cluster.engine",
    "cluster.ray_address",
    "server.checkpoint_every_s",
    "server.design",
    "server.max_connections",
    "server.threads",
    "faults.timeout_s",
    "faults.retry_timeout_s",
    "faults.max_restarts",
    "reporting.eval_every_s",
    "reporting.eval_during_training",
    "reporting.draw_plots",
)
"""Config fields a resumed run may change: none changes what is computed or by how many."""


STAGE_GROUP_PREFIX = "group-stage"
"""Partition ``S`` of a model-parallel job keeps its shards' checkpoints in ``group-stageS``:
its parameter group ``stageS`` (``pipeline/job.py``) saved in the group's folder
(``server/groups.py``). Named here too, as both modules load torch."""


def check_checkpoints(directory: Path, num_shards: int, *, missing_ok: bool = False) -> None:
    """Check every shard's last checkpoint in ``directory``, and its row tables' where there
    are any: present (for every shard, once any shard has one there), whole (their digests),
    this shard's of a job of ``num_shards``, and divided as the launched shards divide (their
    partitioner). Torch-free: the files are read, not loaded.

    ``missing_ok``: a shard's checkpoint missing beside the others' is let be (a run that
    trained nothing: that shard starts from the initial values the others hold).

    Raises:
        CheckpointError: a checkpoint is missing, missing a part, is corrupt, was written by
            another shard or a job of another shard count, or with another partitioner than
            the launched shards'; the message names the file.
    """
    _check_each_shard(directory, num_shards, meta_path, _dense_owner, missing_ok)
    _check_each_shard(directory, num_shards, rows_meta_path, check_rows_meta, missing_ok)


def _dense_owner(directory: Path, shard_id: int) -> tuple[int, int] | None:
    checked = read_checked_meta(directory, shard_id)
    if checked is None:
        return None
    check_launched_partitioner(meta_path(directory, shard_id), saved_partitioner(checked.meta))
    return checked.shard_id, checked.num_shards


def check_launched_partitioner(path: Path, saved: object) -> None:
    """Refuse the checkpoint at ``path`` (a shard's JSON) unless ``saved``, the description of
    the partitioner it was saved with, is the launched shards': they would refuse it only once
    started, and a reshard, which re-cuts with the saved one, would write a set they refuse too.

    Raises:
        CheckpointError: names ``path`` and both partitioners.
    """
    if saved != LAUNCHED_PARTITIONER:
        raise CheckpointError(
            f"{path}: saved with partitioner {json.dumps(saved, sort_keys=True)}; the job's "
            f"shards divide the parameters with {json.dumps(LAUNCHED_PARTITIONER)} and would "
            "not restore it"
        )


def _check_each_shard(
    directory: Path,
    num_shards: int,
    path_of: Callable[[Path, int], Path],
    owner_of: Callable[[Path, int], tuple[int, int] | None],
    missing_ok: bool,
) -> None:
    """One kind of checkpoint file, for every shard: ``owner_of`` checks one and says whose it
    is (None: absent)."""
    missing = []
    for shard_id in range(num_shards):
        owner = owner_of(directory, shard_id)
        if owner is None:
            missing.append(shard_id)
        elif owner != (shard_id, num_shards):
            raise CheckpointError(
                f"{path_of(directory, shard_id)}: holds shard {owner[0]} of {owner[1]}, "
                f"expected shard {shard_id} of {num_shards}"
            )
    if missing and len(missing) < num_shards and not missing_ok:
        # Resumed, the shard would start again from the model's initial values.
        raise CheckpointError(
            f"{path_of(directory, missing[0])}: missing (the other shards' are in "
            f"{directory}; shard {missing[0]} would start again from scratch)"
        )


def read_run_for_resume(run_dir: Path, changes: Mapping[str, object] | None = None) -> JobConfig:
    """The config of the run in ``run_dir`` (its out_dir pointing there, ``changes`` applied),
    after checking its checkpoints: the shards' own, or for Sandblaster those of the folder the
    coordinator's last committed checkpoint names.

    Raises:
        ValueError: ``run_dir`` has no valid config.json, or no shard checkpoints, or one of
            a run's folders or files there is something else (``misplaced_run_entry``), or
            ``changes`` names a field not in ``RESUMABLE_FIELDS``.
        ConfigFieldError: a value in ``changes`` is out of range.
        CheckpointError: a checkpoint is missing a part or corrupt, a shard's or a partition's
            is missing beside the others', or Sandblaster's commit record is missing beside
            its shards' checkpoints (names the file or folder).
    """
    changes = dict(changes or {})
    fixed = sorted(set(changes) - set(RESUMABLE_FIELDS))
    if fixed:
        raise ValueError(f"a resumed run keeps its {', '.join(fixed)}")
    misplaced = misplaced_run_entry(run_dir)
    if misplaced is not None:  # its checkpoints a file: not a run that saved none
        raise ValueError(f"--resume {run_dir}: {misplaced}")
    config = JobConfig.from_file(run_dir / "config.json")
    directory = run_dir / CHECKPOINT_DIR
    try:
        if config.optimizer.algorithm == "sandblaster":
            directory = _committed_folder(directory)
        folders = checkpoint_folders(directory, config.pipeline.num_partitions)
        if not any(any(folder.glob("shard*.json")) for folder in folders):
            raise nothing_to_resume(run_dir, directory)
        # A run stopped before its first step (Ctrl-C) may have saved some shards' initial
        # values and not others' yet, in a partition or in all of one: nothing has trained,
        # so those start again from their initial values as the others do. Refused, the run
        # could neither resume nor start again (its folder holds checkpoints).
        untrained = _nothing_trained(folders, config.cluster.num_shards)
        for folder in folders:
            if untrained and not any(folder.glob("shard*.json")):
                continue
            check_partition_folder(folder, directory)
            check_checkpoints(folder, config.cluster.num_shards, missing_ok=untrained)
            if folder != directory and not any(folder.glob("shard*.json")):
                raise CheckpointError(f"{folder}: holds no shard checkpoints, as the others do")
    except CheckpointError as e:
        raise CheckpointError(f"--resume {run_dir}: cannot resume: {e}") from e
    if config.optimizer.algorithm == "sandblaster":
        _check_budgets_go_past(run_dir, changes)
    return config.with_fields({**changes, "reporting.out_dir": str(run_dir)})


def _check_budgets_go_past(run_dir: Path, changes: Mapping[str, object]) -> None:
    """A Sandblaster resume's new ``--max-iterations`` or ``--max-evaluations``: one the run
    has reached already would end it at once, having done nothing (read after the checkpoint
    checks: the record is sound).

    Raises:
        ConfigFieldError: the bound is not past what the committed checkpoint has done.
    """
    for field, count, what in _done_so_far(read_record(run_dir / CHECKPOINT_DIR)):
        bound = changes.get(field)
        if bound is not None and int(bound) <= count:
            raise ConfigFieldError(
                field,
                f"{run_dir} has done {count} {what} already (its last committed checkpoint): "
                f"give more than {count} to go on",
            )


def check_budgets_left(run_dir: Path, config: JobConfig) -> None:
    """A resumed Sandblaster run's bounds as it will run (its config.json's, or those the
    resume raised): one it has reached already would start the job for nothing (a run that
    stopped at its ``--max-iterations``, resumed with a larger ``--max-evaluations`` alone).
    Checked after the checkpoints' model and layout, which matter more.

    Raises:
        ConfigFieldError: a bound is not past what the committed checkpoint has done.
    """
    if config.optimizer.algorithm != "sandblaster":
        return
    record = read_record(run_dir / CHECKPOINT_DIR)
    stopped = None if record is None else record["state"].get("stop_reason")
    if stopped not in RESUMABLE_STOPS:
        # Converged (a tolerance met) or diverged: no bound raised takes it further, and the
        # job started only to say so.
        raise ValueError(
            f"--resume {run_dir}: it stopped for good ({stopped}): raising a bound does not "
            "take it further"
        )
    for field, count, what in _done_so_far(record):
        name = field.split(".")[1]
        bound = getattr(config.sandblaster, name)
        if bound is not None and int(bound) <= count:
            raise ConfigFieldError(
                field,
                f"{run_dir} has done {count} {what} already (its last committed checkpoint): "
                f"its {name} is {int(bound)}: give {flag_of('train', field)} more than "
                f"{count} to go on",
            )


def _done_so_far(record: dict | None) -> list[tuple[str, int, str]]:
    """Per Sandblaster bound (its config field), what the last committed checkpoint (its
    coordinator's ``record``) has done, and what the count is of; none without one."""
    if record is None:
        return []
    return [
        ("sandblaster.max_iterations", int(record["iteration"]), "iterations"),
        (
            "sandblaster.max_evaluations",
            int(record["state"].get("num_evaluations", 0)),
            "objective evaluations",
        ),
    ]


def checkpoint_folders(directory: Path, num_partitions: int) -> list[Path]:
    """Where the shards' checkpoints of a job of ``num_partitions`` are: ``directory`` and its
    group folders, every partition's among them (present or not) when there are several."""
    found = {p for p in directory.glob("group-*") if p.is_dir()}
    if num_partitions > 1:
        found |= {directory / f"{STAGE_GROUP_PREFIX}{s}" for s in range(num_partitions)}
    return [directory, *sorted(found)]


def check_partition_folder(folder: Path, directory: Path) -> None:
    """Refuse a partition's folder (one of ``checkpoint_folders``) that is missing.

    Raises:
        CheckpointError: naming the folder.
    """
    if not folder.is_dir():
        # Resumed, that partition's shards would start again from the initial values.
        raise CheckpointError(
            f"{folder}: missing (the other partitions' are in {directory}; "
            f"partition {folder.name.removeprefix(STAGE_GROUP_PREFIX)} would start "
            "again from scratch)"
        )


def _nothing_trained(folders: list[Path], num_shards: int) -> bool:
    """Whether every shard checkpoint in ``folders`` holds version 0 (no update applied): a
    run stopped before its first step. A checkpoint that cannot be read counts as trained:
    the checks that follow name it."""
    for folder in folders:
        for shard_id in range(num_shards):
            try:
                meta = read_meta(folder, shard_id)
            except CheckpointError:
                return False
            if meta is not None and meta["version"] != 0:
                return False
    return True


def _committed_folder(directory: Path) -> Path:
    """The folder Sandblaster's shards restore from: the one its coordinator's last committed
    checkpoint names (``directory`` itself when there is none, nor any shard's to restore).

    Raises:
        CheckpointError: the coordinator's record is unreadable or names a missing folder, or
            is missing while shards' checkpoints are there (names the file).
    """
    folder = restore_folder(directory)
    if folder is not None:
        return Path(folder)
    saved = sorted(p for p in directory.glob(f"{TAG_PREFIX}*") if any(p.glob("shard*.json")))
    if saved:
        # Without the commit record no iteration of theirs is known to be whole.
        raise CheckpointError(
            f"{directory / RECORD_FILE}: missing (the coordinator's state, and the commit of "
            f"the shards' checkpoints in {saved[-1]})"
        )
    return directory
