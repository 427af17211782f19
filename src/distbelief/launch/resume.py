"""Resuming a run folder: its config (sectioned, or flat as runs wrote it before the sections)
and its shard checkpoints, checked before any process starts, so a corrupt or missing file is
one clear error naming the file instead of a shard's traceback. A resumed run keeps its config,
but for the few fields that say how long it goes on and how it runs (``RESUMABLE_FIELDS``). The
check reads the files without torch: ``distbelief train`` runs it before it starts the
processes, and a refused resume costs no torch import."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from distbelief.config import JobConfig
from distbelief.coordinator.checkpoint import restore_folder
from distbelief.errors import CheckpointError
from distbelief.launch.cluster import CHECKPOINT_DIR
from distbelief.server.checkpoint_meta import meta_path, read_checked_meta

RESUMABLE_FIELDS = (
    "sandblaster.max_iterations",
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
)
"""Config fields a resumed run may change: none changes what is computed or by how many."""


def check_checkpoints(directory: Path, num_shards: int) -> None:
    """Check every shard's last checkpoint in ``directory``: present, whole (its digest) and
    this shard's of a job of ``num_shards``. Torch-free: the files are read, not loaded.

    Raises:
        CheckpointError: a checkpoint is missing a part, is corrupt, or was written by another
            shard or a job of another shard count; the message names the file.
    """
    for shard_id in range(num_shards):
        checked = read_checked_meta(directory, shard_id)
        if checked is None:
            continue
        if (checked.shard_id, checked.num_shards) != (shard_id, num_shards):
            raise CheckpointError(
                f"{meta_path(directory, shard_id)}: holds shard {checked.shard_id} of "
                f"{checked.num_shards}, expected shard {shard_id} of {num_shards}"
            )


def read_run_for_resume(run_dir: Path, changes: Mapping[str, object] | None = None) -> JobConfig:
    """The config of the run in ``run_dir`` (its out_dir pointing there, ``changes`` applied),
    after checking its checkpoints: the shards' own, or for Sandblaster those of the folder the
    coordinator's last committed checkpoint names.

    Raises:
        ValueError: ``run_dir`` has no valid config.json, or no shard checkpoints, or
            ``changes`` names a field not in ``RESUMABLE_FIELDS``.
        ConfigFieldError: a value in ``changes`` is out of range.
        CheckpointError: a checkpoint is missing a part or corrupt (names the file).
    """
    changes = dict(changes or {})
    fixed = sorted(set(changes) - set(RESUMABLE_FIELDS))
    if fixed:
        raise ValueError(f"a resumed run keeps its {', '.join(fixed)}")
    config = JobConfig.from_file(run_dir / "config.json")
    directory = run_dir / CHECKPOINT_DIR
    try:
        if config.optimizer.algorithm == "sandblaster":
            folder = restore_folder(directory)
            directory = directory if folder is None else Path(folder)
        # A model-parallel job's shards save each partition's group in a folder of its own.
        folders = [directory, *sorted(p for p in directory.glob("group-*") if p.is_dir())]
        if not any(any(folder.glob("shard*.json")) for folder in folders):
            raise ValueError(f"--resume {run_dir}: no shard checkpoints in {directory}")
        for folder in folders:
            check_checkpoints(folder, config.cluster.num_shards)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {run_dir}: cannot resume: {e}") from e
    return config.with_fields({**changes, "reporting.out_dir": str(run_dir)})
