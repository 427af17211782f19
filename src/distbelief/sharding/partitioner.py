"""Partitioners: which slices of the flat parameter vectors each shard owns.

A partitioner is a value both sides hold: the client slices its pushes and pulls with it, the
shard sizes its buffers with it, and the handshake compares their JSON descriptions so that two
different layouts are a clear error, not a silent mix. Pure functions of the specs, no I/O.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from distbelief.sharding.layout import ShardSlice, TensorSpec, group_sizes


class Partitioner(Protocol):
    """Maps a model's specs to each shard's slices of the flat per-dtype vectors."""

    def partition(self, specs: Sequence[TensorSpec], num_shards: int) -> list[list[ShardSlice]]:
        """``result[shard_id]``: the slices that shard owns, in a fixed order.

        Raises:
            ValueError: ``num_shards`` < 1, or nothing to shard.
        """
        ...

    def to_json(self) -> dict:
        """A JSON-able description; equal descriptions mean equal layouts for equal specs."""
        ...


def describe_partitioner(partitioner: Partitioner) -> str:
    """The canonical text of a partitioner's description (for comparisons and messages)."""
    return json.dumps(partitioner.to_json(), sort_keys=True, separators=(",", ":"))


def _check_arguments(sizes: dict[torch.dtype, int], num_shards: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not sizes:
        raise ValueError("the model has no parameters to shard")


class FlatPartitioner:
    """Byte-balanced: shard ``s`` of ``S`` owns elements ``[N*s//S, N*(s+1)//S)`` of every
    dtype group, so every shard holds 1/S of the bytes (to one element) and a large tensor is
    split across shards. One contiguous slice per dtype: no gather on push or pull."""

    def partition(self, specs: Sequence[TensorSpec], num_shards: int) -> list[list[ShardSlice]]:
        """Each shard's slices: an equal cut of each dtype's flat vector (see
        ``Partitioner.partition``)."""
        sizes = group_sizes(specs)
        _check_arguments(sizes, num_shards)
        return [
            [
                ShardSlice(
                    dtype, total * shard_id // num_shards, total * (shard_id + 1) // num_shards
                )
                for dtype, total in sizes.items()
            ]
            for shard_id in range(num_shards)
        ]

    def to_json(self) -> dict:
        """A JSON-able description (see ``Partitioner.to_json``)."""
        return {"kind": "flat"}


def _row_numel(spec: TensorSpec) -> int:
    """Elements in one row (first-dimension index) of ``spec``; 1 for scalars and vectors."""
    if len(spec.shape) < 2 or spec.shape[0] == 0:
        return 1
    return spec.numel // spec.shape[0]


class RowAlignedPartitioner:
    """Like :class:`FlatPartitioner`, but every cut falls on a row boundary of the tensor it
    lands in, so no row (an embedding's row, say) is ever split between shards.

    Each cut is the row boundary nearest to the flat layout's cut, so every shard's size is
    within one row (of the widest tensor it cuts) of 1/S of its dtype group.
    """

    def partition(self, specs: Sequence[TensorSpec], num_shards: int) -> list[list[ShardSlice]]:
        """Each shard's slices, cut at row boundaries (see ``Partitioner.partition``)."""
        sizes = group_sizes(specs)
        _check_arguments(sizes, num_shards)
        per_shard: list[list[ShardSlice]] = [[] for _ in range(num_shards)]
        for dtype, total in sizes.items():
            tensors = [spec for spec in specs if spec.dtype == dtype]
            cuts = [
                _row_cut(tensors, total * shard_id // num_shards)
                for shard_id in range(1, num_shards)
            ]
            bounds = [0, *cuts, total]
            for shard_id in range(num_shards):
                per_shard[shard_id].append(
                    ShardSlice(dtype, bounds[shard_id], bounds[shard_id + 1])
                )
        return per_shard

    def to_json(self) -> dict:
        """A JSON-able description (see ``Partitioner.to_json``)."""
        return {"kind": "row-aligned"}


def _row_cut(tensors: Sequence[TensorSpec], ideal: int) -> int:
    """The row boundary nearest to flat position ``ideal`` (the tensors of one dtype group)."""
    offsets, running = [], 0
    for spec in tensors:
        offsets.append(running)
        running += spec.numel
    # The last tensor starting at or before ``ideal`` that has elements holds it.
    index = bisect.bisect_right(offsets, ideal) - 1
    while index > 0 and tensors[index].numel == 0:
        index -= 1
    offset, spec = offsets[index], tensors[index]
    row = _row_numel(spec)
    rows_before = (ideal - offset + row // 2) // row
    # Monotone in ``ideal`` (rounding to the nearest point of one sorted set), so the
    # slices never overlap.
    return offset + min(rows_before * row, spec.numel)


class ParameterGroupPartitioner:
    """Shards only the named parameters (a model-parallel stage's, say), with ``inner``.

    ``inner`` partitions the named tensors as if they were the whole model; its slices are then
    mapped back onto the full flat vectors, split where the named tensors are not adjacent.
    The other parameters are owned by no shard.

    Args:
        inner: How the group is divided among the shards.
        names: The parameters in the group.

    Raises:
        ValueError: ``names`` is empty.
    """

    def __init__(self, inner: Partitioner, names: Iterable[str]) -> None:
        self.inner = inner
        self.names = tuple(sorted(set(names)))
        if not self.names:
            raise ValueError("a parameter group needs at least one parameter name")

    def partition(self, specs: Sequence[TensorSpec], num_shards: int) -> list[list[ShardSlice]]:
        """Raises ValueError also when a name is not one of the model's parameters."""
        known = {spec.name for spec in specs}
        unknown = [name for name in self.names if name not in known]
        if unknown:
            raise ValueError(f"parameter group names {unknown} are not parameters of the model")
        maps = _group_maps(specs, set(self.names))
        return [
            [piece for inner in pieces for piece in _map_back(inner, maps[inner.dtype])]
            for pieces in self.inner.partition(
                [s for s in specs if s.name in self.names], num_shards
            )
        ]

    def to_json(self) -> dict:
        """A JSON-able description (see ``Partitioner.to_json``)."""
        return {"kind": "parameter-group", "names": list(self.names), "inner": self.inner.to_json()}


def _group_maps(
    specs: Sequence[TensorSpec], names: set[str]
) -> dict[torch.dtype, list[tuple[int, int, int]]]:
    """Per dtype, ``(group offset, full offset, numel)`` of each named tensor with elements."""
    maps: dict[torch.dtype, list[tuple[int, int, int]]] = {}
    group_offsets: dict[torch.dtype, int] = {}
    full_offsets: dict[torch.dtype, int] = {}
    for spec in specs:
        full = full_offsets.get(spec.dtype, 0)
        full_offsets[spec.dtype] = full + spec.numel
        if spec.name not in names:
            continue
        group = group_offsets.get(spec.dtype, 0)
        group_offsets[spec.dtype] = group + spec.numel
        maps.setdefault(spec.dtype, [])
        if spec.numel:
            maps[spec.dtype].append((group, full, spec.numel))
    return maps


def _map_back(piece: ShardSlice, spans: list[tuple[int, int, int]]) -> list[ShardSlice]:
    """``piece`` (of the group's flat vector) as slices of the full flat vector."""
    mapped: list[ShardSlice] = []
    for group, full, numel in spans:
        start, stop = max(piece.start, group), min(piece.stop, group + numel)
        if start >= stop:
            continue
        begin, end = full + start - group, full + stop - group
        if mapped and mapped[-1].stop == begin:
            mapped[-1] = ShardSlice(piece.dtype, mapped[-1].start, end)  # adjacent tensors
        else:
            mapped.append(ShardSlice(piece.dtype, begin, end))
    if mapped:
        return mapped
    # An empty piece stays as one empty slice, as the flat layout keeps it: every shard has
    # at least one buffer, so its optimizer is never built over no parameters.
    anchor = 0
    for group, full, numel in reversed(spans):
        if piece.start >= group:
            anchor = full + min(piece.start - group, numel)
            break
    return [ShardSlice(piece.dtype, anchor, anchor)]


def partitioner_from_json(raw: object) -> Partitioner:
    """The partitioner :meth:`Partitioner.to_json` described.

    Raises:
        ValueError: ``raw`` is not a description of a known partitioner.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
        raise ValueError(f"malformed partitioner description {raw!r}")
    kind = raw["kind"]
    if kind == "flat" and len(raw) == 1:
        return FlatPartitioner()
    if kind == "row-aligned" and len(raw) == 1:
        return RowAlignedPartitioner()
    if kind == "parameter-group" and set(raw) == {"kind", "names", "inner"}:
        names = raw["names"]
        if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
            raise ValueError(f"parameter group names must be a list of strings, got {names!r}")
        return ParameterGroupPartitioner(partitioner_from_json(raw["inner"]), names)
    raise ValueError(f"unknown partitioner description {raw!r}")
