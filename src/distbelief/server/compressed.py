"""A connection's compressed pushes and pulls (``wire/compression.py``): the buffers narrowed or
sparse tensors are received into and narrowed pulls are sent from, and their conversion from and
to the full-width slices. The shard and its optimizer only ever see full slices: a top-k push
reaches them as a dense gradient that is zero where nothing was sent. A pull of changes only
goes out as the indices and values the shard found changed (``changes_tensors``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distbelief.errors import ProtocolError
from distbelief.sharding import ShardSlice
from distbelief.wire.compression import (
    INDICES_SUFFIX,
    SPARSE_KEY,
    VALUES_SUFFIX,
    decode_push_into,
    index_dtype,
    narrow,
    narrow_into,
    requested_dtype,
    travel_dtype,
)


class CompressedSlices:
    """One connection's buffers for the compressed traffic of one shard's ``slices``.

    Buffers are kept per tensor name and reused while a peer sends the same shapes (a worker's
    top-k counts are fixed), so a warm connection allocates nothing per request.
    """

    def __init__(self, slices: Sequence[ShardSlice]) -> None:
        self._slices = {piece.name: piece for piece in slices}
        self._names = [piece.name for piece in slices]
        self._received: dict[str, torch.Tensor] = {}
        self._pull_dtype: torch.dtype | None = None
        self._pull_tensors: list[tuple[str, torch.Tensor]] = []
        self._pull_generation: int | None = None

    def push_sink(
        self, full: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The buffer a compressed push's tensor ``name`` is read into: the full slice ``full``
        holds when it travels as it is, else a reusable buffer of its own.

        Raises:
            ProtocolError: ``name`` is no tensor of this shard's slices.
        """
        base = name.removesuffix(INDICES_SUFFIX).removesuffix(VALUES_SUFFIX)
        piece = self._slices.get(base)
        if piece is None:
            owned = ", ".join(self._names)
            raise ProtocolError(f"a push names {name!r}, not a tensor of the slices {owned}")
        if name == base and dtype == piece.dtype and shape == (piece.numel,):
            return full[name]
        buffer = self._received.get(name)
        if buffer is None or buffer.dtype != dtype or tuple(buffer.shape) != shape:
            buffer = self._received[name] = torch.empty(shape, dtype=dtype)
        return buffer

    def decode_push(
        self,
        meta: dict,
        tensors: Sequence[tuple[str, torch.Tensor]],
        full: dict[str, torch.Tensor],
    ) -> list[torch.Tensor]:
        """The full slices (``full``'s buffers, overwritten) that a compressed push carries.

        Raises:
            ValueError: the push does not carry this shard's slices in the encoding it names.
        """
        outs = [full[name] for name in self._names]
        requested_dtype(meta)  # a push naming an unknown dtype is refused, as a pull is
        decode_push_into(outs, self._names, tensors, sparse=bool(meta.get(SPARSE_KEY)))
        return outs

    def pull_tensors(
        self,
        meta: dict,
        full: Sequence[tuple[str, torch.Tensor]],
        generation: int | None,
    ) -> list[tuple[str, torch.Tensor]]:
        """What a pull's reply carries: ``full`` (name, slice) pairs, narrowed to the dtype the
        pull asks for (converted again only when ``generation`` changed).

        Raises:
            ValueError: the pull asks for a dtype slices cannot be narrowed to.
        """
        dtype = requested_dtype(meta)
        if dtype is None:
            return list(full)
        if dtype != self._pull_dtype:
            self._pull_tensors = [(name, _narrow_buffer(t, dtype)) for name, t in full]
            self._pull_dtype, self._pull_generation = dtype, None
        if generation is None or generation != self._pull_generation:
            for (_, sent), (_, values) in zip(self._pull_tensors, full, strict=True):
                if sent is not values:
                    narrow_into(sent, values)
            self._pull_generation = generation
        return self._pull_tensors


def _narrow_buffer(full: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where a pull's narrowed copy of ``full`` is kept (``full`` itself if it does not narrow)."""
    return (
        full
        if travel_dtype(full.dtype, dtype) == full.dtype
        else full.new_empty(full.shape, dtype=dtype)
    )


def max_changed_elements(slices: Sequence[ShardSlice], dtype: torch.dtype | None) -> int:
    """The most changed elements a pull of changes carries sparse: beyond, half the bytes of
    the whole slices (in ``dtype``, if narrowed) would not be saved."""
    numel = sum(piece.numel for piece in slices)
    value_bytes = max(travel_dtype(piece.dtype, dtype).itemsize for piece in slices)
    index_bytes = index_dtype(max(piece.numel for piece in slices)).itemsize
    return numel * value_bytes // (2 * (index_bytes + value_bytes))


def changes_tensors(
    changes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    slices: Sequence[ShardSlice],
    dtype: torch.dtype | None,
) -> list[tuple[str, torch.Tensor]]:
    """A pull reply's tensors for the changed elements ``changes`` ((indices, values) per
    slice): ``NAME#indices`` and ``NAME#values``, the values narrowed to ``dtype`` if given."""
    tensors = []
    for (indices, values), piece in zip(changes, slices, strict=True):
        tensors.append((piece.name + INDICES_SUFFIX, indices.to(index_dtype(piece.numel))))
        tensors.append(
            (piece.name + VALUES_SUFFIX, narrow(values, travel_dtype(values.dtype, dtype)))
        )
    return tensors
