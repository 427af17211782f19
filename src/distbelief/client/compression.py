"""A worker's side of compressed pushes and pulls (``wire/compression.py``).

Pushes: the accrued gradient is narrowed and/or cut to its top-k elements per slice, with error
feedback: whatever a push does not carry (the unsent elements, the rounding of the sent ones)
stays in the accrued buffer and goes out with a later push, so nothing is lost, only delayed.
Works on the buffer's own device; copying the result to the host is the caller's. Pulls: the
buffers narrowed slices are read into before they are widened into the caller's, and
``HeldValues``, which lets a pull into the same buffers as the last one ask only for what
changed since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from distbelief.sharding import ShardSlice
from distbelief.wire.compression import (
    GENERATION_KEY,
    INDICES_SUFFIX,
    SINCE_KEY,
    VALUES_SUFFIX,
    WireCompression,
    index_dtype,
    narrow,
    travel_dtype,
)

ShardTensors = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class EncodedPush:
    """One push made ready for the wire: each shard's tensors, and the meta that says how
    they are encoded (``ParameterServerClient.push`` sends it as it is)."""

    shard_tensors: list[ShardTensors]
    """Per shard id, the (name, tensor) pairs of its message, on the host."""
    meta: dict = field(default_factory=dict)
    """Added to each shard's push meta."""


def encode_slice(accrued: torch.Tensor, name: str, compression: WireCompression) -> ShardTensors:
    """The tensors one push carries of the 1-D slice ``accrued``, which keeps what they do not
    carry: ``decoded(result) + accrued_after == accrued_before`` element by element, exactly
    (a number minus its own rounding to a narrower float is exact).

    Top-k sends the elements of largest magnitude (``NAME#indices``, ``NAME#values``); the
    values, or without top-k the whole slice, travel in the compression's dtype.
    """
    dtype = travel_dtype(accrued.dtype, compression.dtype)
    if compression.topk_fraction is None:
        if dtype == accrued.dtype:
            sent = accrued.clone()
            accrued.zero_()
        else:
            sent = narrow(accrued, dtype)
            accrued.sub_(sent)
        return [(name, sent)]
    chosen = accrued.abs().topk(compression.topk_count(accrued.numel()), sorted=False).indices
    values = narrow(accrued[chosen], dtype)
    if dtype == accrued.dtype:
        accrued.index_fill_(0, chosen, 0)
    else:
        # The chosen elements keep the rounding of their narrowed values.
        accrued.index_add_(0, chosen, values.to(accrued.dtype), alpha=-1)
    indices = chosen.to(index_dtype(accrued.numel()))
    return [(name + INDICES_SUFFIX, indices), (name + VALUES_SUFFIX, values)]


class PushCompressor:
    """Encodes a worker's accrued gradient for pushes to every shard, with error feedback.

    Args:
        compression: The encoding (a lossy one: narrowed and/or top-k).
        slices: Per shard id, the slices it owns (the client's partition of the layout).
    """

    def __init__(self, compression: WireCompression, slices: Sequence[Sequence[ShardSlice]]):
        if not compression.lossy_push:
            raise ValueError("a PushCompressor needs a narrow dtype or top-k")
        self.compression = compression
        self.slices = [list(pieces) for pieces in slices]

    def encode(self, accrued: dict[torch.dtype, torch.Tensor]) -> EncodedPush:
        """One push of ``accrued`` (flat buffers by dtype, on any device); what it does not
        carry is left in ``accrued``. The tensors are on ``accrued``'s device."""
        shard_tensors = []
        for pieces in self.slices:
            tensors: ShardTensors = []
            for piece in pieces:
                view = accrued[piece.dtype][piece.start : piece.stop]
                tensors.extend(encode_slice(view, piece.name, self.compression))
            shard_tensors.append(tensors)
        return EncodedPush(shard_tensors, self.compression.push_meta())


class NarrowPullStaging:
    """Buffers the slices of a narrowed pull are read into, then widened into the caller's
    (one per slice name, reused: a shard's pulls run one at a time)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._buffers: dict[str, torch.Tensor] = {}

    def sink(self, name: str, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Where the reply's tensor ``name`` is read into: the narrow buffer of the target of
        that name (a wide target itself); None for a name that is no target's."""
        target = targets.get(name)
        return None if target is None else self._buffer(name, target)

    def widen(self, targets: dict[str, torch.Tensor]) -> None:
        """Widen the narrow buffers, once a reply is read, into the ``targets``."""
        for name, target in targets.items():
            buffer = self._buffer(name, target)
            if buffer is not target:
                target.copy_(buffer)

    def _buffer(self, name: str, target: torch.Tensor) -> torch.Tensor:
        dtype = travel_dtype(target.dtype, self.dtype)
        if dtype == target.dtype:
            return target
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != target.shape:
            buffer = self._buffers[name] = torch.empty(target.shape, dtype=dtype)
        return buffer


class HeldValues:
    """Per shard, which of its values a worker's pull buffers hold (the shard's life and
    generation of the last pull that completed into them), so that the next pull into the
    same buffers asks the shard for the changed elements only. The buffers must not be
    written by anything but pulls (DownpourSGD's inbox is not).

    Args:
        num_shards: The shards pulled from.
    """

    def __init__(self, num_shards: int) -> None:
        self._held: list[tuple[list, tuple] | None] = [None] * num_shards

    def since(self, shard_id: int, targets: dict[str, torch.Tensor]) -> dict:
        """The pull meta asking shard ``shard_id`` for the changes since what ``targets`` hold
        (null: they hold nothing of its, or are other buffers); until :meth:`pulled`, they
        count as holding nothing (a pull may stop half-way through them)."""
        held, self._held[shard_id] = self._held[shard_id], None
        key = _buffers_key(targets)
        return {SINCE_KEY: held[0] if held is not None and held[1] == key else None}

    def pulled(self, shard_id: int, targets: dict[str, torch.Tensor], reply_meta: dict) -> None:
        """``targets`` now hold the values of the reply (full, or changes applied)."""
        generation = reply_meta.get(GENERATION_KEY)
        if isinstance(generation, list):
            self._held[shard_id] = (generation, _buffers_key(targets))


def _buffers_key(targets: dict[str, torch.Tensor]) -> tuple:
    return tuple((name, t.data_ptr(), t.numel(), t.dtype) for name, t in targets.items())
