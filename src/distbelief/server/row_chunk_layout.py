"""What each chunk file of a row checkpoint holds: its tensors' names, dtypes and shapes, from its
table's entry in ``rows-shard{i}.json``, checked against the file's safetensors header
(``read_tensor_header``) without loading the file. The launcher checks every chunk so before a
resume starts anything; a shard checks each so before it loads it. Torch-free, as
``checkpoint_meta.py``: rows and their state are float32, ids, counts and steps int64.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from distbelief.errors import CheckpointError
from distbelief.server.checkpoint_meta import (
    TENSOR_DTYPES,
    read_rows_meta,
    read_tensor_header,
    rows_meta_path,
)

Layout = dict[str, tuple[str, tuple[int, ...]]]
"""Tensor name -> (safetensors dtype, shape), as ``read_tensor_header`` answers."""

OPTIONAL_PENDING_KEYS = ("last_step",)
"""What a pending chunk written before pending ids had a last step lacks."""


def row_chunk_layout(entry: Mapping, num_rows: int) -> Layout:
    """A row chunk of ``num_rows`` rows of the table ``entry`` describes: ids, values, each
    state tensor (``state.NAME``) and the step of each row's last push."""
    return {
        "ids": ("I64", (num_rows,)),
        "values": ("F32", (num_rows, int(entry["dim"]))),
        **{
            f"state.{name}": ("F32", (num_rows, *(int(d) for d in shape)))
            for name, shape in entry["state_shapes"].items()
        },
        "last_step": ("I64", (num_rows,)),
    }


def pending_chunk_layout(num_ids: int) -> Layout:
    """A pending chunk of ``num_ids`` ids awaiting admission: ids, counts, last pushes."""
    return {key: ("I64", (num_ids,)) for key in ("ids", "counts", "last_step")}


def check_chunk_header(path: Path, expected: Layout, optional: tuple[str, ...] = ()) -> None:
    """Refuse the chunk file ``path`` unless its header lists exactly the tensors of
    ``expected`` (those of ``optional`` may be absent), of their dtypes and shapes.

    Raises:
        CheckpointError: the file or its header is unreadable, or does not describe the file.
        ValueError: a tensor is missing, extra, or of another dtype or shape (named).
    """
    found = read_tensor_header(path)
    for name, wanted in expected.items():
        if name not in found:
            if name in optional:
                continue
            raise ValueError(f"tensor {name!r} is missing")
        if found[name] != wanted:
            raise ValueError(f"tensor {name!r} is {_said(found[name])}, not {_said(wanted)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]!r}")


def _said(entry: tuple[str, tuple[int, ...]]) -> str:
    dtype, shape = entry
    return f"{TENSOR_DTYPES[dtype][0]} {list(shape)}"


def check_row_chunks(directory: str | Path, shard_id: int) -> None:
    """Refuse shard ``shard_id``'s row checkpoint in ``directory`` (if it has one) unless every
    chunk file's header lists what its table restores (``check_chunk_header``). Its digests
    are not checked (``checkpoint_meta.check_rows_meta`` does).

    Raises:
        CheckpointError: the JSON is unreadable, or a chunk's header is, or lists a tensor
            missing, extra, or of another dtype or shape; the message names the file and the
            tensor.
    """
    meta = read_rows_meta(directory, shard_id)
    if meta is None:
        return
    try:
        for name, entry in meta["tables"].items():
            for chunk in entry["row_chunks"]:
                layout = row_chunk_layout(entry, int(chunk["num_rows"]))
                _check_chunk(Path(directory), shard_id, name, chunk, layout, ())
            for chunk in entry["pending_chunks"]:
                layout = pending_chunk_layout(int(chunk["num_rows"]))
                _check_chunk(Path(directory), shard_id, name, chunk, layout, OPTIONAL_PENDING_KEYS)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        path = rows_meta_path(directory, shard_id)
        raise CheckpointError(f"{path}: unreadable row checkpoint: {e!r}") from e


def _check_chunk(
    directory: Path, shard_id: int, table: str, chunk: Mapping, layout: Layout, optional: tuple
) -> None:
    path = directory / str(chunk["file"])
    try:
        check_chunk_header(path, layout, optional)
    except CheckpointError:  # a ValueError too, already naming the file
        raise
    except ValueError as e:
        raise CheckpointError(
            f"{path}: shard {shard_id} would not restore it: table {table!r}: {e}"
        ) from e
