"""Row tables on disk: one shard's embedding rows, their optimizer state and pending admissions,
in safetensors chunk files of at most ``chunk_rows`` rows named by one JSON file per shard.
Knows the ``RowTable.state_dict()`` layout, not the table; the dense parameters' checkpoints
are ``checkpoint.py``'s. Writes are atomic: a crash mid-save leaves the previous save in force.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from distbelief.errors import CheckpointError
from distbelief.files import sha256_file, sync_folder
from distbelief.sealed_json import write_sealed_json
from distbelief.server.checkpoint import write_tensor_file
from distbelief.server.checkpoint_meta import read_rows_meta, rows_meta_path
from distbelief.server.row_chunk_layout import (
    OPTIONAL_PENDING_KEYS,
    Layout,
    check_chunk_header,
    pending_chunk_layout,
    row_chunk_layout,
)
from distbelief.sharding.rows import mix64

FORMAT_VERSION = 1
"""``rows-shard{i}.json`` holds ``format``, ``shard_id``, ``num_shards``, ``version``,
``chunk_rows`` and ``tables``: name -> ``dim``, ``optimizer``, ``state_shapes`` (state name ->
shape of one row), ``num_steps``, ``num_admitted``, ``num_evicted``, ``settings`` (the caller's
dict, kept as given), ``num_rows``, ``num_pending``, ``checksum`` (see ``table_checksum``) and
``row_chunks`` / ``pending_chunks``: lists of ``{"file", "sha256", "num_rows"}``; and
``meta_sha256``, the SHA-256 of all the others (``sealed_json``; a file without it, written
before it was, is read too). A row chunk holds ``ids``, ``values``, ``state.NAME`` per state
tensor and ``last_step``; a pending chunk ``ids``, ``counts`` and ``last_step`` (a chunk
written before pending ids had a last step holds none: its ids count as pushed at the table's
last step). Chunk files are
``rows-shard{i}-v{version:012d}-{token}-t{table index}-rows{n}.safetensors`` (``pending{n}``);
the random token keeps two saves of one version apart."""

DEFAULT_CHUNK_ROWS = 65536
"""Rows per chunk file unless the caller says otherwise."""

_TABLE_KEYS = (
    "dim",
    "optimizer",
    "ids",
    "values",
    "state",
    "last_step",
    "pending_ids",
    "pending_counts",
    "pending_last_step",
    "num_steps",
    "num_admitted",
    "num_evicted",
)
_BLOCK_ROWS = 1 << 16  # rows hashed at a time: bounds the checksum's temporary memory
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True, slots=True)
class RowTablesCheckpoint:
    """One shard's row tables as saved."""

    shard_id: int
    num_shards: int
    version: int
    chunk_rows: int
    tables: dict[str, dict]
    """Table name -> a ``RowTable.state_dict()`` plus ``"settings"`` (a dict, maybe empty)."""


def _wrap64(value: int) -> int:
    """``value`` modulo 2^64, as a signed 64-bit integer."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _words(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each row's bits as int64 words (floats by bit pattern, so -0.0 and NaNs count too)."""
    flat = tensor.reshape(num_rows, -1)
    if flat.dtype.is_floating_point:
        flat = flat.contiguous().view(_INT_OF_SIZE[flat.element_size()])
    return flat.to(torch.int64)


def _sum64(tensor: torch.Tensor) -> int:
    return _wrap64(int(tensor.sum())) if tensor.numel() else 0


def table_checksum(table: Mapping) -> dict[str, int]:
    """What proves that a table's rows survived a save or a reshard, whatever their order.

    ``num_rows`` and ``num_pending`` count; ``ids_sum`` (mod 2^64) and ``ids_xor`` combine the
    ids; ``rows_digest`` sums (mod 2^64) one hash per row of its id, the bits of its values and
    of each state tensor (by name) and its age ``num_steps - last_step``; ``pending_digest`` sums
    one hash per pending id of the id, its count and its age (an age of 0 adds nothing: the
    digest of a table saved before pending ids had an age). Sums and xors do not depend on row
    order, and merge across shards (``merge_checksums``). Float sums would not: their rounding
    depends on the order rows are added in, and they would miss rows that moved between ids.
    Ages rather than steps: a reshard may move a row to a table with another step count.
    """
    ids = table["ids"]
    num_rows = ids.numel()
    ages = int(table["num_steps"]) - table["last_step"]
    parts = [table["values"], *(table["state"][name] for name in sorted(table["state"]))]
    rows_digest = 0
    for start in range(0, num_rows, _BLOCK_ROWS):
        stop = min(num_rows, start + _BLOCK_ROWS)
        words = torch.cat(
            [*(_words(part[start:stop], stop - start) for part in parts), ages[start:stop, None]],
            dim=1,
        )
        columns = torch.arange(1, words.shape[1] + 1, dtype=torch.int64)
        mixed = mix64(words + mix64(columns)).sum(dim=1)
        rows_digest += _sum64(mix64(mix64(ids[start:stop]) ^ mixed))
    pending_ids = table["pending_ids"]
    pending_ages = int(table["num_steps"]) - table["pending_last_step"]
    pending_words = mix64(pending_ids) ^ table["pending_counts"] ^ (pending_ages << 32)
    return {
        "num_rows": num_rows,
        "ids_sum": _sum64(ids),
        "ids_xor": int(np.bitwise_xor.reduce(ids.numpy())) if num_rows else 0,
        "rows_digest": _wrap64(rows_digest),
        "num_pending": pending_ids.numel(),
        "pending_digest": _sum64(mix64(pending_words)),
    }


def merge_checksums(checksums: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The checksum of the union of tables with these checksums (disjoint rows)."""
    total = dict.fromkeys(
        ("num_rows", "ids_sum", "ids_xor", "rows_digest", "num_pending", "pending_digest"), 0
    )
    for checksum in checksums:
        for key, value in checksum.items():
            total[key] = total[key] ^ value if key == "ids_xor" else total[key] + value
    for key in ("ids_sum", "rows_digest", "pending_digest"):
        total[key] = _wrap64(total[key])
    return total


def _check_table(name: object, table: Mapping) -> None:
    """ValueError naming the table unless it is a state dict that can be saved."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"row table names must be non-empty strings, got {name!r}")
    missing = [key for key in _TABLE_KEYS if key not in table]
    if missing:
        raise ValueError(f"row table {name!r}: state dict lacks {', '.join(missing)}")
    ids, num_rows = table["ids"], table["ids"].numel()
    problems = {
        "ids": ids.dtype == torch.int64 and ids.dim() == 1,
        "values": table["values"].shape == (num_rows, table["dim"]),
        "last_step": table["last_step"].dtype == torch.int64
        and table["last_step"].shape == (num_rows,),
        "pending_ids": table["pending_ids"].dtype == torch.int64
        and table["pending_ids"].dim() == 1,
        **{
            key: table[key].dtype == torch.int64 and table[key].shape == table["pending_ids"].shape
            for key in ("pending_counts", "pending_last_step")
        },
        **{
            f"state {key!r}": tensor.dim() >= 1 and tensor.shape[0] == num_rows
            for key, tensor in table["state"].items()
        },
    }
    bad = [key for key, ok in problems.items() if not ok]
    if bad:
        raise ValueError(f"row table {name!r}: {bad[0]} does not match its {num_rows} ids")
    try:
        json.dumps(table.get("settings") or {})
    except (TypeError, ValueError) as e:
        raise ValueError(f"row table {name!r}: settings are not JSON-able: {e}") from e


def save_row_tables(
    directory: str | Path,
    shard_id: int,
    num_shards: int,
    version: int,
    tables: Mapping[str, Mapping],
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Path:
    """Write shard ``shard_id``'s row tables into ``directory``; returns the JSON file's path.

    Args:
        tables: Table name -> ``RowTable.state_dict()``, optionally with ``"settings"``: a
            JSON-able dict saved as it is (how to rebuild the table, say).
        chunk_rows: Most rows (and most pending ids) per chunk file.

    Raises:
        ValueError: a bad shard id, chunk size or table state dict (names the table).
        OSError: the files could not be written (the previous save stays in force).
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for name, table in tables.items():
        _check_table(name, table)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"rows-shard{shard_id}-v{version:012d}-{secrets.token_hex(4)}"
    written: list[Path] = []
    meta = {
        "format": FORMAT_VERSION,
        "shard_id": shard_id,
        "num_shards": num_shards,
        "version": version,
        "chunk_rows": chunk_rows,
    }
    try:
        meta["tables"] = {
            name: _save_table(directory, f"{stem}-t{index}", table, chunk_rows, written)
            for index, (name, table) in enumerate(tables.items())
        }
        sync_folder(directory)  # the chunks' renames land before the JSON that names them
        meta_path = rows_meta_path(directory, shard_id)
        write_sealed_json(meta_path, meta)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    sync_folder(directory)
    _remove_older(directory, shard_id, {path.name for path in written})
    return meta_path


def _remove_older(directory: Path, shard_id: int, keep: set[str]) -> None:
    """Delete shard ``shard_id``'s chunk files that the JSON in force no longer names."""
    for old in directory.glob(f"rows-shard{shard_id}-v*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _save_table(
    directory: Path, stem: str, table: Mapping, chunk_rows: int, written: list[Path]
) -> dict:
    num_rows, num_pending = table["ids"].numel(), table["pending_ids"].numel()
    row_chunks = []
    for index, start in enumerate(range(0, num_rows, chunk_rows)):
        rows = slice(start, min(num_rows, start + chunk_rows))
        tensors = {
            "ids": table["ids"][rows],
            "values": table["values"][rows],
            **{f"state.{key}": tensor[rows] for key, tensor in table["state"].items()},
            "last_step": table["last_step"][rows],
        }
        row_chunks.append(_write_chunk(directory / f"{stem}-rows{index}.safetensors", tensors))
        written.append(directory / row_chunks[-1]["file"])
    pending_chunks = []
    for index, start in enumerate(range(0, num_pending, chunk_rows)):
        rows = slice(start, min(num_pending, start + chunk_rows))
        tensors = {
            "ids": table["pending_ids"][rows],
            "counts": table["pending_counts"][rows],
            "last_step": table["pending_last_step"][rows],
        }
        path = directory / f"{stem}-pending{index}.safetensors"
        pending_chunks.append(_write_chunk(path, tensors))
        written.append(path)
    return {
        "dim": int(table["dim"]),
        "optimizer": str(table["optimizer"]),
        "state_shapes": {key: list(t.shape[1:]) for key, t in table["state"].items()},
        "num_steps": int(table["num_steps"]),
        "num_admitted": int(table["num_admitted"]),
        "num_evicted": int(table["num_evicted"]),
        "settings": dict(table.get("settings") or {}),
        "num_rows": num_rows,
        "num_pending": num_pending,
        "checksum": table_checksum(table),
        "row_chunks": row_chunks,
        "pending_chunks": pending_chunks,
    }


def _write_chunk(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    # Copies: a chunk is a view into the table's tensors, and safetensors saves whole storages.
    tensors = {key: tensor.contiguous().clone() for key, tensor in tensors.items()}
    write_tensor_file(path, tensors)
    num_rows = next(iter(tensors.values())).shape[0]
    return {"file": path.name, "sha256": sha256_file(path), "num_rows": num_rows}


def load_row_tables(directory: str | Path, shard_id: int) -> RowTablesCheckpoint | None:
    """Shard ``shard_id``'s last saved row tables in ``directory``, or None if there are none.
    The JSON's own SHA-256, every chunk's and every table's checksum are checked first.

    Raises:
        CheckpointError: the JSON or a chunk is missing, corrupt or of another shard; the
            message names the file.
    """
    directory = Path(directory)
    meta_path = rows_meta_path(directory, shard_id)
    meta = read_rows_meta(directory, shard_id)
    if meta is None:
        return None
    try:
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise CheckpointError(f"{meta_path}: unknown row checkpoint format {found!r}")
        if int(meta["shard_id"]) != shard_id:
            raise CheckpointError(f"{meta_path}: holds shard {meta['shard_id']}, not {shard_id}")
        return RowTablesCheckpoint(
            shard_id=shard_id,
            num_shards=int(meta["num_shards"]),
            version=int(meta["version"]),
            chunk_rows=int(meta["chunk_rows"]),
            tables={
                str(name): _load_table(directory, meta_path, str(name), entry)
                for name, entry in meta["tables"].items()
            },
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable row checkpoint: {_one_line(e)}") from e


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _load_table(directory: Path, meta_path: Path, name: str, entry: dict) -> dict:
    dim = int(entry["dim"])
    shapes = {
        str(key): tuple(int(d) for d in shape) for key, shape in entry["state_shapes"].items()
    }
    rows = [
        _read_chunk(directory, meta_path, chunk, row_chunk_layout(entry, int(chunk["num_rows"])))
        for chunk in entry["row_chunks"]
    ]
    pending = [
        _read_chunk(
            directory,
            meta_path,
            chunk,
            pending_chunk_layout(int(chunk["num_rows"])),
            OPTIONAL_PENDING_KEYS,
        )
        for chunk in entry["pending_chunks"]
    ]
    num_steps = int(entry["num_steps"])
    for chunk in pending:  # written before pending ids had a last step: pushed at the last
        chunk.setdefault("last_step", torch.full_like(chunk["ids"], num_steps))

    def joined(chunks: list[dict], key: str, empty: torch.Tensor) -> torch.Tensor:
        return torch.cat([chunk[key] for chunk in chunks]) if chunks else empty

    no_ids = torch.zeros(0, dtype=torch.int64)
    table = {
        "dim": dim,
        "optimizer": str(entry["optimizer"]),
        "ids": joined(rows, "ids", no_ids),
        "values": joined(rows, "values", torch.zeros(0, dim)),
        "state": {
            key: joined(rows, f"state.{key}", torch.zeros(0, *shape))
            for key, shape in shapes.items()
        },
        "last_step": joined(rows, "last_step", no_ids),
        "pending_ids": joined(pending, "ids", no_ids),
        "pending_counts": joined(pending, "counts", no_ids),
        "pending_last_step": joined(pending, "last_step", no_ids),
        "num_steps": num_steps,
        "num_admitted": int(entry["num_admitted"]),
        "num_evicted": int(entry["num_evicted"]),
        "settings": dict(entry["settings"]),
    }
    try:
        _check_table(name, table)
    except ValueError as e:
        raise CheckpointError(f"{meta_path}: {e}") from e
    shapes_ok = all(table["state"][key].shape[1:] == shape for key, shape in shapes.items())
    counts = (table["ids"].numel(), table["pending_ids"].numel())
    if not shapes_ok or counts != (int(entry["num_rows"]), int(entry["num_pending"])):
        raise CheckpointError(f"{meta_path}: table {name!r}: its chunks do not add up to it")
    if table_checksum(table) != entry["checksum"]:
        raise CheckpointError(f"{meta_path}: table {name!r}: rows do not match its checksum")
    return table


def _read_chunk(
    directory: Path, meta_path: Path, chunk: dict, layout: Layout, optional: tuple = ()
) -> dict:
    """The tensors of one chunk file: those of ``layout`` (``optional`` ones may be absent),
    their header checked before the data is loaded (``check_chunk_header``)."""
    file_name = str(chunk["file"])
    path = directory / file_name
    if Path(file_name).name != file_name:
        raise CheckpointError(f"{meta_path}: names {file_name!r}, which is not a file name")
    if not path.is_file():
        raise CheckpointError(f"{meta_path}: names {file_name}, which is missing")
    if sha256_file(path) != chunk["sha256"]:
        raise CheckpointError(f"{path}: corrupt (SHA-256 does not match {meta_path.name})")
    try:
        check_chunk_header(path, layout, optional)
        tensors = load_file(str(path))
    except CheckpointError:
        raise
    except ValueError as e:  # a tensor the table would not take, named
        raise CheckpointError(f"{path}: {e}") from e
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable chunk: {_one_line(e)}") from e
    return tensors
