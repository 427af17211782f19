"""Shard checkpoints on disk: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint of shard ``i`` is ``shard{i}-v{version}.safetensors`` (the shard's named tensors)
plus ``shard{i}.json`` (its JSON-able values, the tensor file's name and SHA-256, and the
SHA-256 of the JSON's other fields: see ``sealed_json``); what each tensor or value means is the
shard's business. Each file is written to a temporary name and renamed; the JSON is renamed
last, so it always names a complete tensor file, and older tensor files are removed only after
that. A reader checks both digests before trusting anything. What a save killed midway left
(its temporaries, named after the shard's files) is removed when the shard next restores.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distbelief.errors import CheckpointError
from distbelief.files import sha256_file, write_file_atomic
from distbelief.sealed_json import write_sealed_json
from distbelief.server.checkpoint_meta import (
    FORMAT_VERSION,
    TENSOR_DTYPES,
    meta_path,
    read_checked_meta,
    read_meta,
    read_tensor_header,
)
from distbelief.server.optimizers import ServerOptimizerFactory
from distbelief.server.shard import ParameterShard, ShardState
from distbelief.sharding import FlatPartitioner

logger = logging.getLogger(__name__)

_POLL_S = 0.1


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically.

    safetensors writes a temporary file of its own (``.tmpXXXXXX``) beside the one it is given;
    it is given one in a folder ``.NAME.XXXXXXXX.tmp`` next to ``path``, so that what a process
    killed mid-save leaves is named after ``path`` (``remove_unfinished_saves`` deletes it).

    Raises:
        OSError: the file could not be written. safetensors reports a failed write (a full
            disk, say) as its own error; callers that log and retry failed writes see it as
            the OSError every other write raises.
    """
    staging = _make_staging_folder(path)
    try:
        staged = staging / path.name
        write_file_atomic(staged, lambda tmp: save_file(tensors, str(tmp)))
        try:
            staged.replace(path)
        except OSError as e:  # a folder where it goes, say: named as path, as above
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except SafetensorError as e:
        raise OSError(f"cannot write {path}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_staging_folder(path: Path) -> Path:
    """The temporary folder ``write_tensor_file`` writes ``path`` in. A folder that cannot be
    made there (a read-only or full disk) is an OSError naming ``path``, not the temporary
    name, which exists nowhere and differs at every try."""
    try:
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def remove_unfinished_saves(directory: str | Path, stems: tuple[str, ...]) -> None:
    """Delete the temporaries that saves killed midway left in ``directory`` (files and
    folders ``.STEM*.tmp``, for each of ``stems``: a shard's file names up to its version).
    Only the process that owns those files may call it, before it saves: a save under way
    has its temporaries there too."""
    for stem in stems:
        for leftover in Path(directory).glob(f".{stem}*.tmp"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def save_checkpoint(state: ShardState, directory: str | Path) -> Path:
    """Write ``state`` into ``directory``; returns the JSON file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in state.tensors.items()}
    tensor_name = f"shard{state.shard_id}-v{state.version:012d}.safetensors"
    tensor_path = directory / tensor_name
    write_tensor_file(tensor_path, tensors)
    meta = {
        "format": FORMAT_VERSION,
        "shard_id": state.shard_id,
        "num_shards": state.num_shards,
        "version": state.version,
        "values": state.values,
        "tensor_file": tensor_name,
        "tensor_sha256": sha256_file(tensor_path),
    }
    path = meta_path(directory, state.shard_id)
    write_sealed_json(path, meta)
    for old in directory.glob(f"shard{state.shard_id}-v*.safetensors"):
        if old.name != tensor_name:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(directory: str | Path, shard_id: int) -> ShardState | None:
    """The last checkpoint of ``shard_id`` in ``directory``, or None if there is none.

    Raises:
        CheckpointError: a part is missing or corrupt; the message names the file.
    """
    checked = read_checked_meta(directory, shard_id)
    if checked is None:
        return None
    try:
        return _state_from(checked.meta, load_file(str(checked.tensor_path)))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        path = meta_path(Path(directory), shard_id)
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from e


def check_tensor_file(
    directory: str | Path, shard_id: int, optimizer_factory: ServerOptimizerFactory
) -> None:
    """Refuse shard ``shard_id``'s last checkpoint in ``directory`` (if it has one) unless a
    shard of ``optimizer_factory`` would restore its tensors: their names, dtypes and shapes,
    read from the tensor file's header (``read_tensor_header``), not its data, which is not
    loaded. Its digests are not checked (``resume.check_checkpoints`` does).

    Raises:
        CheckpointError: the JSON or the tensor file's header is unreadable, or a tensor is
            missing, extra, or of another dtype or shape than the shard's; the message names
            the file and the tensor.
    """
    meta = read_meta(directory, shard_id)
    if meta is None:
        return
    tensor_path = Path(directory) / str(meta["tensor_file"])
    header = read_tensor_header(tensor_path)
    try:  # AttributeError: a torch older than one of safetensors' dtypes
        tensors = {
            name: torch.empty(shape, dtype=getattr(torch, TENSOR_DTYPES[dtype][0]), device="meta")
            for name, (dtype, shape) in header.items()
        }
        state = _state_from(meta, tensors)
        ParameterShard(state.shard_id, state.num_shards, optimizer_factory).check_restores(state)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{tensor_path}: shard {shard_id} would not restore it: {e}") from e


def _state_from(meta: dict, tensors: dict[str, torch.Tensor]) -> ShardState:
    values = meta["values"] if meta["format"] == FORMAT_VERSION else _format1_values(meta)
    return ShardState(
        shard_id=int(meta["shard_id"]),
        num_shards=int(meta["num_shards"]),
        version=int(meta["version"]),
        tensors=tensors,
        values=values,
    )


def _format1_values(meta: dict) -> dict:
    """The values of a format-1 checkpoint, which held exactly a flat-partitioned shard's
    parameters (``param.I``) and optimizer state (``optim.I.KEY``) under today's names."""
    return {
        "specs": meta["specs"],
        "partitioner": FlatPartitioner().to_json(),
        "num_pushes": meta["num_pushes"],
        "last_push": meta["last_push"],
        "store": {
            "buffers": {"param": int(meta["num_params"])},
            "optimizer": meta["optimizer"],
            "optimizer_plain_state": meta["optimizer_plain_state"],
            "values": {},
        },
    }


class Checkpointer:
    """Saves a shard every ``every_s`` seconds when it changed, at once after its first
    initialisation (so a restart always finds the layout), and once more at :meth:`stop`.

    Args:
        shard: The shard to save (a ParameterShard, or anything with its ``initialized``,
            ``version``, ``shard_id`` and ``snapshot()``: the shard's row tables, say).
        directory: Where the checkpoint files go.
        every_s: Seconds between periodic saves; bounds the updates a crash can lose.
        save: Writes a snapshot into ``directory`` (default: ``save_checkpoint``).
        on_finished: Called with each snapshot and whether its save succeeded (a shard tells
            its clients which of their pushes are on disk).
    """

    def __init__(
        self, shard, directory: str | Path, every_s: float, *, save=None, on_finished=None
    ) -> None:
        if every_s <= 0:
            raise ValueError(f"checkpoint interval must be > 0 s, got {every_s}")
        self.shard = shard
        self._save = save if save is not None else save_checkpoint
        self._on_finished = on_finished
        self.directory = Path(directory)
        self.every_s = every_s
        self.saved_version: int | None = None
        # One save at a time: the thread's, and one a request asks for (``save_if_changed``).
        self._save_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)

    def start(self) -> Checkpointer:
        self._thread.start()
        return self

    def save_if_changed(self) -> bool:
        """Save now if the shard changed since the last save; whether it saved.

        Raises:
            OSError: the files could not be written.
        """
        with self._save_lock:
            return self._save_if_changed()

    def _save_if_changed(self) -> bool:
        if not self.shard.initialized or self.shard.version == self.saved_version:
            return False
        state = self.shard.snapshot()
        try:
            self._save(state, self.directory)
        except BaseException:
            if self._on_finished is not None:
                self._on_finished(state, False)
            raise
        self.saved_version = state.version
        if self._on_finished is not None:
            self._on_finished(state, True)
        logger.info("shard %d: checkpoint at version %d", state.shard_id, state.version)
        return True

    def _run(self) -> None:
        next_save_s = time.monotonic() + self.every_s
        first_tried = False  # a first save that fails is retried every every_s, as others
        while not self._stop.wait(_POLL_S):
            first_save = not first_tried and self.shard.initialized and self.saved_version is None
            if first_save or time.monotonic() >= next_save_s:
                first_tried = first_tried or first_save
                try:
                    self.save_if_changed()
                except OSError as e:
                    logger.error("checkpoint of shard %d failed: %s", self.shard.shard_id, e)
                except Exception:
                    # Whatever failed, the shard keeps serving: its saves must go on too (a
                    # dead thread would leave its clients holding every push for replay).
                    logger.exception("checkpoint of shard %d failed", self.shard.shard_id)
                next_save_s = time.monotonic() + self.every_s

    def stop(self) -> None:
        """Stop the periodic saves and write a last checkpoint."""
        self._stop.set()
        self._thread.join(timeout=60)
        self.save_if_changed()
