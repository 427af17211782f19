"""``distbelief reshard``: a stopped run's checkpoints rewritten for another shard count. Every old
checkpoint is read and checked first; the new set goes into a folder beside ``checkpoints/``,
is read back and compared with the old, and only then are the folders swapped and config.json
rewritten. Any failure before the swap leaves the run folder as it was.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distbelief.config import ClusterConfig, JobConfig
from distbelief.coordinator.checkpoint import TAG_PREFIX, read_record
from distbelief.deferred_signals import signals_deferred
from distbelief.errors import CheckpointError, ConfigFieldError
from distbelief.files import give_mode_of_written, sync_folder
from distbelief.launch.cluster import CHECKPOINT_DIR
from distbelief.launch.resume import (
    check_launched_partitioner,
    check_partition_folder,
    checkpoint_folders,
)
from distbelief.launch.resume_layout import check_every_shard_gets_parameters
from distbelief.launch.run_lock import run_dir_locked
from distbelief.launch.rundir import (
    RESHARD_ASIDE_PREFIX,
    interrupted_reshard,
    missing_run_folder,
)
from distbelief.server.checkpoint import load_checkpoint, save_checkpoint
from distbelief.server.reshard_dense import (
    WholeModel,
    assemble_model,
    describe_difference,
    split_model,
)
from distbelief.server.reshard_rows import reshard_row_tables, row_totals
from distbelief.server.row_checkpoint import (
    RowTablesCheckpoint,
    load_row_tables,
    rows_meta_path,
    save_row_tables,
)
from distbelief.server.shard import ShardState
from distbelief.sharding.rows import row_shard

_SHARD_FILES = re.compile(
    r"shard\d+\.json|shard\d+-v\d+\.safetensors|rows-shard\d+\.json|rows-shard\d+-v.+\.safetensors"
    r"|\..+\.tmp"
)
"""Files of a checkpoint folder that the new set replaces (temporaries of a crashed save too)."""


_STAGING_PREFIX = f"{CHECKPOINT_DIR}.reshard-"
"""The folder the new set is written to, beside ``checkpoints/``, before it takes its place."""


@dataclass(frozen=True, slots=True)
class OverBound:
    """A new shard's part of a table that holds more than the run's ``--max-rows-per-shard``
    (resharded onto fewer shards)."""

    shard_id: int
    table: str
    count: int
    what: str
    """"rows", or "ids awaiting admission" where those are the more."""


@dataclass(frozen=True, slots=True)
class ReshardSummary:
    """What a reshard rewrote."""

    run_dir: Path
    old_num_shards: int
    num_shards: int
    num_folders: int
    """Checkpoint folders rewritten: those of the run's and each model-parallel group's that
    held a shard's checkpoint."""
    num_dense_tensors: int
    """Parameter tensors over all folders."""
    num_tables: int
    num_rows: int
    max_rows_per_shard: int | None = None
    """The run's bound on one shard's rows per table (None: no bound)."""
    over_bound: OverBound | None = None
    """The new shard part furthest past ``max_rows_per_shard``, if any is: kept whole here,
    cut to the bound by the shard that restores it."""

    def line(self) -> str:
        """The summary as one line for the terminal."""
        said = (
            f"resharded {self.run_dir}: {self.old_num_shards} -> {self.num_shards} shards; "
            f"{self.num_dense_tensors} dense tensors in {self.num_folders} checkpoint folder(s), "
            f"{self.num_tables} row table(s) with {self.num_rows} rows"
        )
        over = self.over_bound
        if over is None:
            return said
        return (
            f"{said}; shard {over.shard_id} holds {over.count} {over.what} of table "
            f"{over.table!r}, more than --max-rows-per-shard {self.max_rows_per_shard}: it "
            f"keeps the {self.max_rows_per_shard} most recently pushed when it restores them"
        )


@dataclass(slots=True)
class _Folder:
    """One checkpoint folder's old shards, read and checked, and their new cut."""

    relative: Path
    dense: list[ShardState] | None
    rows: list[RowTablesCheckpoint] | None
    model: WholeModel | None = None
    new_rows: list[dict[str, dict]] | None = None


def reshard_run(run_dir: str | Path, num_shards: int) -> ReshardSummary:
    """Rewrite the checkpoints of the stopped run in ``run_dir`` for ``num_shards`` shards.

    Dense parameters, buffers and optimizer state are put back together and cut again with
    the run's partitioner (``server/reshard_dense.py``); row tables are dealt out again by row
    id (``server/reshard_rows.py``). A Sandblaster run's committed checkpoint is resharded in
    place of its tag; its coordinator record does not depend on the shard count.

    Raises:
        ValueError: ``run_dir`` has no valid config.json or no checkpoints, or already has
            ``num_shards`` shards, or a job is running in it; or the new set could not be
            written (a read-only folder, a full disk): the old set is left as it was.
        ConfigFieldError: ``num_shards`` is out of range (field ``cluster.num_shards``).
        CheckpointError: an old checkpoint is missing, corrupt or partial, or was saved with
            another partitioner than the launched shards' (``check_launched_partitioner``), or
            the new set does not hold what the old one did; the message names the file.
            Nothing changed.
    """
    run_dir = Path(run_dir)
    if missing := missing_run_folder(run_dir):
        raise ValueError(f"{run_dir}: {missing}")
    with run_dir_locked(run_dir, str(run_dir)):
        try:
            return _reshard_stopped_run(run_dir, num_shards)
        except OSError as e:  # a read-only folder, a full disk: before the swap, nothing changed
            where = _named_for_the_user(e.filename, run_dir)
            said = f"{where}: {e.strerror}" if where and e.strerror else str(e)
            raise ValueError(
                f"{run_dir}: cannot write the resharded checkpoints ({said}); nothing changed"
            ) from e


def _named_for_the_user(filename: object, run_dir: Path) -> object:
    """A path in an error, with the new set's folder (random, and removed by then) named as
    what it stands for: the run folder it could not be made in, or ``checkpoints/``."""
    if not isinstance(filename, str | os.PathLike):
        return filename
    parts = Path(filename).parts
    for at, part in enumerate(parts):
        if part.startswith(_STAGING_PREFIX):
            inside = parts[at + 1 :]
            return run_dir / CHECKPOINT_DIR / Path(*inside) if inside else run_dir
    return filename


def _reshard_stopped_run(run_dir: Path, num_shards: int) -> ReshardSummary:
    config, new_config = _configs(run_dir, num_shards)
    _remove_unfinished_reshards(run_dir)
    old_num_shards = config.cluster.num_shards
    root = run_dir / CHECKPOINT_DIR
    base = _base_folder(root, config)  # none to reshard is said first, whatever the count
    if num_shards == old_num_shards:
        raise ValueError(f"{run_dir} already has {num_shards} shards")
    partitions = checkpoint_folders(base, config.pipeline.num_partitions)
    for folder in partitions:
        check_partition_folder(folder, base)
    folders = [_read_folder(root, folder, old_num_shards) for folder in partitions]
    for folder in folders:
        _check_partitioner(run_dir, root / folder.relative, folder.dense or [])
    if not any(folder.dense or folder.rows for folder in folders):
        raise ValueError(f"{run_dir}: no shard checkpoints in {base}")
    for folder in folders:
        if folder.dense is not None:
            folder.model = _in_folder(root / folder.relative, assemble_model, folder.dense)
    models = [folder.model for folder in folders if folder.model is not None]
    _check_every_shard_gets_parameters(models, num_shards)
    for folder in folders:
        if folder.rows is not None:
            where = root / folder.relative
            folder.new_rows = _in_folder(where, reshard_row_tables, folder.rows, num_shards)
    summary = _summary(run_dir, old_num_shards, num_shards, folders, config)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=run_dir))
    try:
        _copy_others(root, staging, base, {folder.relative for folder in folders})
        for folder in folders:
            _write_folder(staging / folder.relative, folder, num_shards)
        for folder in folders:
            _verify_folder(staging / folder.relative, folder, num_shards)
        # Once begun, the swap finishes: a Ctrl-C in its renames left checkpoints of one shard
        # count and a config of the other, and one just after them stopped a reshard that was
        # done. A stop during it comes too late and is dropped; the command reports it done.
        with signals_deferred(raise_noted=False):
            _swap(run_dir, root, staging, new_config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _remove_unfinished_reshards(run_dir: Path) -> None:
    """Delete what a reshard killed before its swap left: its new set, half-written (a copy of
    the whole checkpoints folder at most), and its new config.json's temporary. The run
    folder's lock is held: no other reshard, or job, is writing them. A ``checkpoints.old-*``
    folder is kept: it may be the only set there is (``_swap``)."""
    for staging in run_dir.glob(f"{_STAGING_PREFIX}*"):
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
    for config_text in run_dir.glob(".config.json.*.tmp"):
        config_text.unlink(missing_ok=True)


def _configs(run_dir: Path, num_shards: int) -> tuple[JobConfig, JobConfig]:
    """The run's config and the one with ``num_shards``, once the request makes sense."""
    try:
        ClusterConfig(num_shards=num_shards)  # the field's own rule, before reading anything
    except ConfigFieldError as e:
        raise ConfigFieldError(f"cluster.{e.field}", e.problem) from e
    config = JobConfig.from_file(run_dir / "config.json")
    return config, config.with_fields({"cluster.num_shards": num_shards})


def _check_every_shard_gets_parameters(models: list[WholeModel], num_shards: int) -> None:
    """Refuses more shards than some checkpoint folder's largest dtype group has elements
    (``check_every_shard_gets_parameters``, as a new job's shard count is checked): a request
    for 2**31 - 1 shards would first write a file pair for each."""
    groups = [
        [flat.numel() for flat in model.buffers.get("param", {}).values()] for model in models
    ]
    check_every_shard_gets_parameters(groups, num_shards)


def _check_partitioner(run_dir: Path, folder: Path, states: list[ShardState]) -> None:
    """Refuses checkpoints saved with another partitioner than the launched shards': cut
    again with it, the new set would be one a resume refuses too."""
    for state in states:
        path = folder / f"shard{state.shard_id}.json"
        try:
            check_launched_partitioner(path, state.values.get("partitioner"))
        except CheckpointError as e:
            raise CheckpointError(f"{run_dir}: cannot reshard: {e}") from e


def _base_folder(root: Path, config: JobConfig) -> Path:
    """The folder the shards restore from: ``checkpoints/``, or the tag that a Sandblaster
    coordinator's last committed checkpoint names."""
    if not root.is_dir():
        interrupted = interrupted_reshard(root.parent)
        if interrupted is not None:
            raise interrupted
        raise ValueError(f"{root.parent}: no {CHECKPOINT_DIR} folder to reshard")
    if config.optimizer.algorithm != "sandblaster":
        return root
    record = read_record(root)
    if record is None:
        raise ValueError(f"{root}: no committed Sandblaster checkpoint to reshard")
    return root / record["tag"]


def _in_folder(folder: Path, function, *args):
    """``function(*args)``, its CheckpointError naming ``folder``."""
    try:
        return function(*args)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from e


def _shard_ids(folder: Path, pattern: str) -> set[int]:
    found = (re.fullmatch(pattern, path.name) for path in folder.iterdir())
    return {int(match.group(1)) for match in found if match}


def _read_folder(root: Path, folder: Path, num_shards: int) -> _Folder:
    """Every old shard's checkpoints in ``folder``, checked complete and of ``num_shards``."""
    dense: list[ShardState] | None = None
    rows: list[RowTablesCheckpoint] | None = None
    dense_ids = _shard_ids(folder, r"shard(\d+)\.json")
    row_ids = _shard_ids(folder, r"rows-shard(\d+)\.json")
    for ids, name in ((dense_ids, "shard{}.json"), (row_ids, "rows-shard{}.json")):
        stray = sorted(i for i in ids if i >= num_shards)
        if stray:
            raise CheckpointError(
                f"{folder / name.format(stray[0])}: shard {stray[0]}, but the run has "
                f"{num_shards} shards"
            )
        missing = sorted(set(range(num_shards)) - ids)
        if ids and missing:
            raise CheckpointError(f"{folder / name.format(missing[0])}: missing")
    if dense_ids:
        dense = []
        for shard_id in range(num_shards):
            state = load_checkpoint(folder, shard_id)
            if state is None:  # removed since the listing
                raise CheckpointError(f"{folder / f'shard{shard_id}.json'}: missing")
            if (state.shard_id, state.num_shards) != (shard_id, num_shards):
                raise CheckpointError(
                    f"{folder / f'shard{shard_id}.json'}: holds shard {state.shard_id} of "
                    f"{state.num_shards}, expected shard {shard_id} of {num_shards}"
                )
            dense.append(state)
    if row_ids:
        rows = []
        for shard_id in range(num_shards):
            checkpoint = load_row_tables(folder, shard_id)
            path = rows_meta_path(folder, shard_id)
            if checkpoint is None:
                raise CheckpointError(f"{path}: missing")
            if checkpoint.num_shards != num_shards:
                raise CheckpointError(
                    f"{path}: written for {checkpoint.num_shards} shards, the run has {num_shards}"
                )
            rows.append(checkpoint)
    return _Folder(folder.relative_to(root), dense, rows)


def _copy_others(root: Path, staging: Path, base: Path, resharded: set[Path]) -> None:
    """Copy into ``staging`` what the new set does not replace: all but the old shard files of
    the resharded folders and, for Sandblaster, the uncommitted tags beside the committed one."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        relative = Path(directory).relative_to(root)
        if relative in resharded:
            return [name for name in names if _SHARD_FILES.fullmatch(name)]
        if base != root and Path(directory) == root:
            return [n for n in names if n.startswith(TAG_PREFIX) and n != base.name]
        return []

    shutil.copytree(root, staging, ignore=ignore, dirs_exist_ok=True)


def _write_folder(target: Path, folder: _Folder, num_shards: int) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if folder.model is not None:
        for state in split_model(folder.model, num_shards):
            save_checkpoint(state, target)
    if folder.rows is not None and folder.new_rows is not None:
        version = max(checkpoint.version for checkpoint in folder.rows)
        chunk_rows = folder.rows[0].chunk_rows
        for shard_id, tables in enumerate(folder.new_rows):
            save_row_tables(target, shard_id, num_shards, version, tables, chunk_rows=chunk_rows)


def _verify_folder(target: Path, folder: _Folder, num_shards: int) -> None:
    """Read the new set back as a shard would and compare it with the old one."""
    if folder.model is not None:
        states = []
        for shard_id in range(num_shards):
            state = load_checkpoint(target, shard_id)
            if state is None:
                raise CheckpointError(f"{target / f'shard{shard_id}.json'}: was not written")
            states.append(state)
        difference = describe_difference(folder.model, _in_folder(target, assemble_model, states))
        if difference is not None:
            raise CheckpointError(f"{target}: the resharded checkpoints differ: {difference}")
    if folder.rows is not None:
        new = [load_row_tables(target, shard_id) for shard_id in range(num_shards)]
        if any(checkpoint is None for checkpoint in new):
            raise CheckpointError(f"{target}: a row checkpoint was not written")
        old_totals = row_totals([checkpoint.tables for checkpoint in folder.rows])
        new_totals = row_totals([checkpoint.tables for checkpoint in new if checkpoint])
        for name, totals in old_totals.items():
            if new_totals.get(name) != totals:
                raise CheckpointError(f"{target}: resharded row table {name!r} differs")
        for checkpoint in new:
            assert checkpoint is not None
            for name, table in checkpoint.tables.items():
                if bool((row_shard(table["ids"], num_shards) != checkpoint.shard_id).any()):
                    raise CheckpointError(f"{target}: table {name!r} has rows on the wrong shard")


def _swap(run_dir: Path, root: Path, staging: Path, config: JobConfig) -> None:
    """Put ``staging`` in place of ``root``, then record the new shard count.

    The new config.json is written to a temporary file first; then three renames: a crash
    between the first two leaves no ``checkpoints/`` folder, and ``reshard_run`` names the
    ``checkpoints.old-*`` folder to rename back. A crash between the second rename and the
    config's leaves checkpoints of the new count and a config of the old one, which
    ``--resume`` refuses, naming the shard files.
    """
    # The new config.json is written first, beside the old one: what is left after the swap
    # are renames, which a full disk does not refuse.
    fd, text_path = tempfile.mkstemp(dir=run_dir, prefix=".config.json.", suffix=".tmp")
    new_config = Path(text_path)
    try:
        give_mode_of_written(fd, run_dir / "config.json")
        with os.fdopen(fd, "w") as handle:
            handle.write(config.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        old = run_dir / f"{RESHARD_ASIDE_PREFIX}{secrets.token_hex(4)}"
        os.rename(root, old)
        try:
            os.rename(staging, root)
        except BaseException:
            os.rename(old, root)
            raise
        os.replace(new_config, run_dir / "config.json")
        sync_folder(run_dir)
    finally:
        new_config.unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)  # the new set is in place: a leftover only


def _summary(
    run_dir: Path, old_num_shards: int, num_shards: int, folders: list[_Folder], config: JobConfig
) -> ReshardSummary:
    tables = [
        {name for checkpoint in folder.rows for name in checkpoint.tables}
        for folder in folders
        if folder.rows
    ]
    num_rows = sum(
        table["ids"].numel()
        for folder in folders
        for checkpoint in folder.rows or []
        for table in checkpoint.tables.values()
    )
    return ReshardSummary(
        run_dir=run_dir,
        old_num_shards=old_num_shards,
        num_shards=num_shards,
        num_folders=sum(1 for folder in folders if folder.dense or folder.rows),
        num_dense_tensors=sum(len(f.model.specs) for f in folders if f.model is not None),
        num_tables=sum(len(names) for names in tables),
        num_rows=num_rows,
        max_rows_per_shard=config.embeddings.max_rows_per_shard,
        over_bound=_furthest_over(folders, config.embeddings.max_rows_per_shard),
    )


def _furthest_over(folders: list[_Folder], bound: int | None) -> OverBound | None:
    """The new shard part with the most rows (or ids awaiting admission) past ``bound``."""
    if bound is None:
        return None
    found = None
    for folder in folders:
        for shard_id, tables in enumerate(folder.new_rows or []):
            for name, table in tables.items():
                rows, pending = table["ids"].numel(), table["pending_ids"].numel()
                count = max(rows, pending)
                if count > bound and (found is None or count > found.count):
                    what = "rows" if rows >= pending else "ids awaiting admission"
                    found = OverBound(shard_id, name, count, what)
    return found
