"""The JSON half of a shard checkpoint (and of its row tables' checkpoint): where it lives,
what it says (shard, shard count, format, the tensors' specs, the tables' row widths) and the
checks that it is as written (the SHA-256 of its fields) and that the tensor files it names are
there and whole (their SHA-256).

Torch-free on purpose: the launcher checks a run's checkpoints before it resumes it, and a
corrupt or foreign file is refused in the time it takes to read the files, without loading torch
first. Reading the tensors themselves is ``server/checkpoint.py``'s job.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from distbelief.errors import CheckpointError
from distbelief.files import sha256_file
from distbelief.sealed_json import check_sealed

FORMAT_VERSION = 2
"""2: the shard's tensors and values as the shard store exports them. 1 (written before the
shard store) is still read."""
_REQUIRED_KEYS = ("shard_id", "num_shards", "version", "tensor_file", "tensor_sha256")
_FORMAT_KEYS = {
    1: ("specs", "num_params", "optimizer", "optimizer_plain_state", "num_pushes", "last_push"),
    FORMAT_VERSION: ("values",),
}
"""What a reader takes from the JSON of each format, besides ``_REQUIRED_KEYS``."""

TENSOR_DTYPES = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
}
"""A safetensors file's dtype names: the torch dtype each is, and its bytes per element."""
MAX_TENSOR_HEADER_BYTES = 100_000_000
"""The longest safetensors header a reader takes (safetensors' own bound): a length past it
is a damaged file, not one to read into memory."""


def meta_path(directory: Path, shard_id: int) -> Path:
    """The JSON file of shard ``shard_id``'s checkpoint in ``directory``."""
    return directory / f"shard{shard_id}.json"


def rows_meta_path(directory: str | Path, shard_id: int) -> Path:
    """Where shard ``shard_id``'s row checkpoint JSON lives in ``directory``."""
    return Path(directory) / f"rows-shard{shard_id}.json"


def read_rows_meta(directory: str | Path, shard_id: int) -> dict | None:
    """The JSON of shard ``shard_id``'s row checkpoint in ``directory`` (its chunk files
    unread: ``check_rows_meta`` checks them), or None if there is none.

    Raises:
        CheckpointError: the file is unreadable, not JSON, or its fields do not match their
            SHA-256; the message names it.
    """
    path = rows_meta_path(directory, shard_id)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable row checkpoint: {e!r}") from e
    check_sealed(meta, path)
    return meta


def check_rows_meta(directory: str | Path, shard_id: int) -> tuple[int, int] | None:
    """(shard id, shard count) of shard ``shard_id``'s row checkpoint in ``directory`` once its
    JSON is read and every chunk file it names is present and whole; None if there is none.

    Raises:
        CheckpointError: the JSON is unreadable, or a chunk file is missing or corrupt; the
            message names the file.
    """
    meta = read_rows_meta(directory, shard_id)
    if meta is None:
        return None
    path = rows_meta_path(directory, shard_id)
    try:
        chunks = [
            chunk
            for table in meta["tables"].values()
            for chunk in (*table["row_chunks"], *table["pending_chunks"])
        ]
        for chunk in chunks:
            chunk_path = Path(directory) / chunk["file"]
            if not chunk_path.exists():
                raise CheckpointError(f"{path}: names {chunk_path.name}, which is missing")
            if sha256_file(chunk_path) != chunk["sha256"]:
                raise CheckpointError(f"{chunk_path}: corrupt (SHA-256 does not match {path})")
        return int(meta["shard_id"]), int(meta["num_shards"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable row checkpoint: {e!r}") from e


@dataclass(frozen=True)
class SavedRowTable:
    """What a row checkpoint says of one table, besides its rows."""

    dim: int
    """Values per row."""
    optimizer: str
    """The row optimizer's stored name (``row_optimizers.flag_name_of`` gives its flag's)."""
    num_embeddings: int | None
    """The rows the table was made for (None: a checkpoint that does not say)."""


def saved_row_tables(directory: str | Path, shard_id: int) -> dict[str, SavedRowTable] | None:
    """Table name -> what shard ``shard_id``'s row checkpoint in ``directory`` says of it (its
    JSON only), or None if there is none.

    Raises:
        CheckpointError: the JSON is unreadable; the message names the file.
    """
    meta = read_rows_meta(directory, shard_id)
    if meta is None:
        return None
    try:
        tables = {}
        for name, table in meta["tables"].items():
            rows = (table.get("settings") or {}).get("num_embeddings")
            tables[str(name)] = SavedRowTable(
                int(table["dim"]), str(table["optimizer"]), None if rows is None else int(rows)
            )
        return tables
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        path = rows_meta_path(directory, shard_id)
        raise CheckpointError(f"{path}: unreadable row checkpoint: {e!r}") from e


@dataclass(frozen=True)
class CheckedMeta:
    """A checkpoint's JSON whose tensor file is present and matches its digest."""

    meta: dict
    tensor_path: Path
    shard_id: int
    num_shards: int


def read_meta(directory: str | Path, shard_id: int) -> dict | None:
    """The JSON of shard ``shard_id``'s last checkpoint in ``directory``, of a known format
    and with every key its format needs (its tensor file unread: ``read_checked_meta`` checks
    it), or None if there is none.

    Raises:
        CheckpointError: the JSON is unreadable, of an unknown format, or its fields do not
            match their SHA-256; the message names the file.
    """
    path = meta_path(Path(directory), shard_id)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: unreadable checkpoint: not a JSON object")
    if meta.get("format") not in _FORMAT_KEYS:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}")
    check_sealed(meta, path)
    missing = [k for k in (*_REQUIRED_KEYS, *_FORMAT_KEYS[meta["format"]]) if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: unreadable checkpoint: no {', '.join(missing)}")
    return meta


def saved_specs(meta: dict) -> object:
    """The tensor specs (``specs_to_json``'s form) a checkpoint's JSON (``read_meta``) holds,
    in either format; None if it holds none."""
    values = meta.get("values")
    return values.get("specs") if isinstance(values, dict) else meta.get("specs")


LAUNCHED_PARTITIONER = {"kind": "flat"}
"""The description of the partitioner every shard the launcher starts divides its groups with
(``FlatPartitioner``'s: read here without torch); a format-1 checkpoint was saved with it."""


def saved_partitioner(meta: dict) -> object:
    """The description of the partitioner a checkpoint's JSON (``read_meta``) was saved with,
    in either format."""
    values = meta.get("values")
    return values.get("partitioner") if isinstance(values, dict) else LAUNCHED_PARTITIONER


def read_checked_meta(directory: str | Path, shard_id: int) -> CheckedMeta | None:
    """The last checkpoint of ``shard_id`` in ``directory`` with its tensor file checked, or
    None if there is none.

    Raises:
        CheckpointError: the JSON is unreadable or of an unknown format, or its tensor file is
            missing or corrupt; the message names the file.
    """
    meta = read_meta(directory, shard_id)
    if meta is None:
        return None
    path = meta_path(Path(directory), shard_id)
    try:
        tensor_path = Path(directory) / meta["tensor_file"]
        if not tensor_path.exists():
            raise CheckpointError(f"{path}: names {tensor_path.name}, which is missing")
        if sha256_file(tensor_path) != meta["tensor_sha256"]:
            raise CheckpointError(f"{tensor_path}: corrupt (SHA-256 does not match {path})")
        return CheckedMeta(
            meta=meta,
            tensor_path=tensor_path,
            shard_id=int(meta["shard_id"]),
            num_shards=int(meta["num_shards"]),
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from e


def read_tensor_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) of the safetensors file ``path``, from its header alone
    (an 8-byte little-endian length, then that much JSON), once the header is checked to
    describe the file: known dtypes, and tensors that fill its data exactly, each its shape's
    worth of bytes.

    Raises:
        CheckpointError: the file is unreadable, its header too long for it or
            ``MAX_TENSOR_HEADER_BYTES``, not JSON, or not of the file; the message names it.
    """
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > min(size - 8, MAX_TENSOR_HEADER_BYTES):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
        return _tensor_layout(header, size - 8 - length)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable tensor file: {e}") from e


def _tensor_layout(header: object, data_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``read_tensor_header``'s answer from a header's JSON (ValueError unless it is one of a
    file with ``data_bytes`` bytes of tensors)."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name!r}: not a dtype, shape and data offsets") from None
        if not isinstance(dtype, str) or dtype not in TENSOR_DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        numbers = [*shape, begin, end] if isinstance(shape, list) else [None]
        if not all(type(n) is int and n >= 0 for n in numbers):
            raise ValueError(f"tensor {name!r}: shape {shape!r}, data offsets {[begin, end]}")
        if end - begin != math.prod(shape) * TENSOR_DTYPES[dtype][1]:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes for {dtype} {shape}")
        layout[name] = (dtype, tuple(shape))
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            break
        covered = end
    if covered != data_bytes:
        raise ValueError(f"its tensors do not fill its {data_bytes} bytes of data exactly")
    return layout
