"""Sandblaster's checkpoints: a two-phase save that never leaves the shards and the coordinator
at different iterations.

Before the first evaluation the coordinator has every shard save the start point into
``lbfgs-start``. At an iteration's end it has every shard save into a new folder ``lbfgs-NNNNNN``
(one vector program with a checkpoint tag; the reply means "saved"); only then does it write
``coordinator.json``, naming that folder, with its own state. That file is the commit point: a
crash before it leaves the previous folder in force, and a crash after it loses nothing. Older
folders are removed after the commit.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from distbelief.errors import CheckpointError
from distbelief.sealed_json import check_sealed, write_sealed_json

logger = logging.getLogger(__name__)

RECORD_FILE = "coordinator.json"
TAG_PREFIX = "lbfgs-"
FORMAT_VERSION = 1


def checkpoint_tag(iteration: int, *, started: bool = True) -> str:
    """The folder name of the shards' checkpoints at the end of ``iteration``; ``started``
    False: of the start point, before L-BFGS's first evaluation (``lbfgs-start``)."""
    return f"{TAG_PREFIX}{iteration:06d}" if started else f"{TAG_PREFIX}start"


def read_record(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The last committed coordinator checkpoint (``tag``, ``iteration``, ``state``), or None.

    Raises:
        CheckpointError: the record is unreadable, its fields do not match their SHA-256, or
            it names a folder that is missing.
    """
    path = Path(checkpoint_dir) / RECORD_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unknown format {record.get('format')!r}")
        check_sealed(record, path)
        tag, state = record["tag"], record["state"]
        if not isinstance(tag, str) or not tag.startswith(TAG_PREFIX) or "/" in tag:
            raise CheckpointError(f"{path}: bad checkpoint tag {tag!r}")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: the coordinator state is not an object")
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable coordinator checkpoint: {e}") from e
    if not (Path(checkpoint_dir) / tag).is_dir():
        raise CheckpointError(f"{path}: names {tag}, which is missing")
    return record


def holds_iterations(directory: str | Path) -> bool:
    """Whether ``directory`` is a Sandblaster run's checkpoint folder: its coordinator's record,
    or a folder of one iteration's shard checkpoints (not the shards' files themselves)."""
    directory = Path(directory)
    return (directory / RECORD_FILE).exists() or any(
        path.is_dir() for path in directory.glob(f"{TAG_PREFIX}*")
    )


def restore_folder(checkpoint_dir: str | Path) -> str | None:
    """The folder the shards restore from (None: no committed checkpoint, start afresh)."""
    record = read_record(checkpoint_dir)
    return None if record is None else str(Path(checkpoint_dir) / record["tag"])


def commit(checkpoint_dir: str | Path, tag: str, iteration: int, state: dict[str, Any]) -> None:
    """Record that every shard has saved ``tag`` (the commit point), then remove older tags."""
    directory = Path(checkpoint_dir)
    record = {"format": FORMAT_VERSION, "tag": tag, "iteration": iteration, "state": state}
    write_sealed_json(directory / RECORD_FILE, record)
    for old in directory.glob(f"{TAG_PREFIX}*"):
        if old.is_dir() and old.name != tag:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s committed (iteration %d)", tag, iteration)
