"""A shard's row tables saved and restored with its checkpoints: the periodic saver (the dense
shard's ``Checkpointer``, given the tables) and the restore at start. The files are
``row_checkpoint.py``'s: ``rows-shard{i}.json`` beside the dense ``shard{i}.json``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from distbelief.errors import CheckpointError
from distbelief.server.checkpoint import Checkpointer, remove_unfinished_saves
from distbelief.server.row_checkpoint import load_row_tables, save_row_tables
from distbelief.server.row_tables import ShardTables

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowTablesState:
    """What one save of a shard's tables writes."""

    shard_id: int
    num_shards: int
    version: int
    tables: dict[str, dict]


class _SavedTables:
    """The tables seen as the Checkpointer sees a shard: saved once they exist, again whenever
    a push changed them (their steps summed are the version)."""

    def __init__(self, tables: ShardTables) -> None:
        self.tables = tables
        self.shard_id = tables.shard_id

    @property
    def initialized(self) -> bool:
        return bool(self.tables.names())

    @property
    def version(self) -> int:
        return self.tables.total_steps

    def snapshot(self) -> RowTablesState:
        version, tables = self.tables.snapshot_with_steps()
        return RowTablesState(self.shard_id, self.tables.num_shards, version, tables)


def _save(state: RowTablesState, directory: Path) -> None:
    save_row_tables(directory, state.shard_id, state.num_shards, state.version, state.tables)


def row_checkpointer(tables: ShardTables, directory: str | Path, every_s: float) -> Checkpointer:
    """Saves ``tables`` into ``directory`` every ``every_s`` seconds when pushes changed them,
    and once more at ``stop()`` (not started)."""
    return Checkpointer(_SavedTables(tables), directory, every_s, save=_save)


def restore_row_tables(tables: ShardTables, directory: str | Path | None) -> int | None:
    """Loads the tables' last save in ``directory``; returns its version (None: no save).

    Raises:
        CheckpointError: the save is corrupt, partial, of another shard, or of tables these
            settings cannot hold (another row optimizer or width).
    """
    if directory is None:
        return None
    # What a save of these tables killed midway left (a restart's saves go on here).
    shard = tables.shard_id
    remove_unfinished_saves(directory, (f"rows-shard{shard}-v", f"rows-shard{shard}.json."))
    saved = load_row_tables(directory, tables.shard_id)
    if saved is None:
        return None
    if saved.num_shards != tables.num_shards:
        raise CheckpointError(
            f"{directory}: row tables saved by shard {saved.shard_id} of {saved.num_shards}, "
            f"not of {tables.num_shards} (reshard the run: distbelief reshard RUN_DIR --shards "
            f"{tables.num_shards})"
        )
    try:
        tables.restore(saved.tables)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: row tables of shard {tables.shard_id}: {e}") from e
    logger.info(
        "shard %d restored %d row tables (version %d) from %s",
        tables.shard_id,
        len(saved.tables),
        saved.version,
        directory,
    )
    return saved.version
