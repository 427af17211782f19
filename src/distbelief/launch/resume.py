"""Resuming a run folder: its config (sectioned, or flat as runs wrote it before the sections)
and its shard checkpoints, checked before any process starts, so a corrupt or missing file is
one clear error naming the file instead of a shard's traceback. The checkpoint reader (torch)
is imported only when a run is resumed: ``distbelief train`` imports this module before it
starts the processes, and torch here would delay them by its whole import."""

from __future__ import annotations

from pathlib import Path

from distbelief.config import JobConfig
from distbelief.errors import CheckpointError
from distbelief.launch.cluster import CHECKPOINT_DIR


def check_checkpoints(directory: Path, num_shards: int) -> None:
    """Read every shard's last checkpoint in ``directory`` as the shards will.

    Raises:
        CheckpointError: a checkpoint is missing a part, is corrupt, or was written by another
            shard or a job of another shard count; the message names the file.
    """
    from distbelief.server.checkpoint import load_checkpoint

    for shard_id in range(num_shards):
        state = load_checkpoint(directory, shard_id)
        if state is not None and (state.shard_id, state.num_shards) != (shard_id, num_shards):
            raise CheckpointError(
                f"{directory / f'shard{shard_id}.json'}: holds shard {state.shard_id} of "
                f"{state.num_shards}, expected shard {shard_id} of {num_shards}"
            )


def read_run_for_resume(run_dir: Path) -> JobConfig:
    """The config of the run in ``run_dir`` (its out_dir pointing there), after checking its
    checkpoints.

    Raises:
        ValueError: ``run_dir`` has no valid config.json, or no shard checkpoints.
        CheckpointError: a checkpoint is missing a part or corrupt (names the file).
    """
    config = JobConfig.from_file(run_dir / "config.json")
    directory = run_dir / CHECKPOINT_DIR
    if not any(directory.glob("shard*.json")):
        raise ValueError(f"--resume {run_dir}: no shard checkpoints in {directory}")
    try:
        check_checkpoints(directory, config.cluster.num_shards)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {run_dir}: cannot resume: {e}") from e
    return config.with_fields({"reporting.out_dir": str(run_dir)})
