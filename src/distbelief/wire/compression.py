"""Compressed slices on the wire: the encodings a push or a pull travels in, and the pure
functions that undo them into full-width buffers. Tensors in, tensors out: which part of a
gradient is sent and what is kept back (error feedback) is the client's business, applying it
the shard's.

Narrow: a floating slice travels in bfloat16 or float16 under its own name (the receiver
converts it into its buffer); the request's meta names that dtype under ``DTYPE_KEY`` (a pull
asks for its reply to travel so). Sparse (top-k): a
push whose meta holds ``SPARSE_KEY`` carries each slice as two tensors, ``NAME#indices`` (int32,
int64 past 2**31 elements) and ``NAME#values``; the receiver zero-fills the slice and adds the
values at the indices (a repeated index adds up).

Changes only (pulls): a pull whose meta holds ``SINCE_KEY`` (the shard life and generation of
the values the worker holds, from an earlier reply's ``GENERATION_KEY``) may be answered with
only the elements changed since, as ``NAME#indices`` and ``NAME#values`` under ``SPARSE_KEY``;
the receiver writes the values at the indices and keeps the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distbelief.config import NO_PUSH_COMPRESSION, WIRE_DTYPES, push_compression_fraction
from distbelief.wire.dtypes import dtype_from_name, dtype_name

SPARSE_KEY = "sparse"
"""Push meta: true when every slice travels as indices and values."""
DTYPE_KEY = "wire_dtype"
"""Push and pull meta: the wire name of the dtype floating slices travel in (push: do; pull:
are to, in the reply)."""
SINCE_KEY = "since"
"""Pull meta: [shard life, generation] of the values the puller holds (null: none yet); asks
for a reply of the changed elements only, and for the reply's ``GENERATION_KEY``."""
GENERATION_KEY = "gen"
"""Pull reply meta: [shard life, generation] of the values the reply brings the puller to."""
INDICES_SUFFIX = "#indices"
VALUES_SUFFIX = "#values"

_DTYPES_BY_FLAG = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(_DTYPES_BY_FLAG) == WIRE_DTYPES
NARROW_DTYPES = (torch.bfloat16, torch.float16)
"""The dtypes a floating slice may be narrowed to on the wire."""
_FLOAT16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True, slots=True)
class WireCompression:
    """How one worker's pushes and pulls travel."""

    dtype: torch.dtype | None = None
    """Floating slices wider than this travel in it (bfloat16 or float16); None: as they are."""
    topk_fraction: float | None = None
    """Each pushed slice carries this fraction of its elements, those of largest magnitude
    (at least one); None: pushes are dense."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in NARROW_DTYPES:
            raise ValueError(f"wire dtype must be bfloat16 or float16, got {self.dtype}")
        fraction = self.topk_fraction
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")

    @classmethod
    def parse(cls, wire_dtype: str = "fp32", push_compression: str = "none") -> WireCompression:
        """The compression that ``--wire-dtype`` and ``--push-compression`` describe.

        Raises:
            ValueError: an unknown dtype or compression, naming the argument.
        """
        if wire_dtype not in _DTYPES_BY_FLAG:
            raise ValueError(
                f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}"
            )
        try:
            fraction = push_compression_fraction(
                NO_PUSH_COMPRESSION if push_compression is None else push_compression
            )
        except ValueError as e:
            raise ValueError(f"push_compression {e}") from None
        narrow = _DTYPES_BY_FLAG[wire_dtype]
        return cls(None if narrow == torch.float32 else narrow, fraction)

    @property
    def lossy_push(self) -> bool:
        """Whether a push may not carry the accrued gradient exactly (something stays behind)."""
        return self.dtype is not None or self.topk_fraction is not None

    def travel_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a slice of ``dtype`` travels in."""
        return travel_dtype(dtype, self.dtype)

    def topk_count(self, numel: int) -> int:
        """Elements a pushed slice of ``numel`` carries under top-k."""
        assert self.topk_fraction is not None
        return min(numel, max(1, math.ceil(self.topk_fraction * numel)))

    def push_meta(self) -> dict:
        """What a push's meta says of its encoding (empty: a plain push)."""
        meta = {} if self.dtype is None else {DTYPE_KEY: dtype_name(self.dtype)}
        return meta | ({SPARSE_KEY: True} if self.topk_fraction is not None else {})

    def pull_meta(self) -> dict:
        """What a pull's meta asks of its reply (empty: slices as they are)."""
        return {} if self.dtype is None else {DTYPE_KEY: dtype_name(self.dtype)}


def is_encoded(meta: dict) -> bool:
    """Whether a push's meta says it travels narrowed or sparse."""
    return DTYPE_KEY in meta or SPARSE_KEY in meta


def travel_dtype(dtype: torch.dtype, narrow_to: torch.dtype | None) -> torch.dtype:
    """The dtype a slice of ``dtype`` travels in when slices are narrowed to ``narrow_to``:
    floating slices wider than it are; others travel as they are."""
    if narrow_to is not None and dtype.is_floating_point and dtype.itemsize > narrow_to.itemsize:
        return narrow_to
    return dtype


def narrow(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded to ``dtype`` (to nearest; float16 saturates at its largest finite
    value instead of overflowing to infinity)."""
    if dtype == values.dtype:
        return values
    if dtype == torch.float16:
        values = values.clamp(-_FLOAT16_MAX, _FLOAT16_MAX)
    return values.to(dtype)


def narrow_into(out: torch.Tensor, values: torch.Tensor) -> None:
    """``out`` (a narrow buffer) becomes ``values`` rounded as :func:`narrow` rounds them."""
    if out.dtype == torch.float16:
        values = values.clamp(-_FLOAT16_MAX, _FLOAT16_MAX)
    out.copy_(values)


def index_dtype(numel: int) -> torch.dtype:
    """The smallest index dtype that addresses a slice of ``numel`` elements."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def requested_dtype(meta: dict) -> torch.dtype | None:
    """The narrow dtype a request's meta names (None: slices as they are).

    Raises:
        ValueError: the dtype is not one a slice may be narrowed to.
    """
    name = meta.get(DTYPE_KEY)
    if name is None:
        return None
    dtype = dtype_from_name(name)
    if dtype not in NARROW_DTYPES:
        raise ValueError(f"slices may travel narrowed to bfloat16 or float16, not {name!r}")
    return dtype


def decode_dense_into(out: torch.Tensor, name: str, received: torch.Tensor) -> None:
    """Widen one narrowed slice into ``out``.

    Raises:
        ValueError: ``received`` is not a floating tensor of ``out``'s shape.
    """
    if not received.dtype.is_floating_point or received.shape != out.shape:
        raise ValueError(
            f"tensor {name!r}: expected a floating tensor of shape {list(out.shape)}, "
            f"got {received.dtype} {list(received.shape)}"
        )
    out.copy_(received)


def decode_sparse_into(
    out: torch.Tensor, name: str, indices: torch.Tensor, values: torch.Tensor
) -> None:
    """``out`` becomes zero but for ``values`` added at ``indices`` (one top-k slice).

    Raises:
        ValueError: the indices are not integers, are out of range, or do not pair with the
            values.
    """
    _check_sparse(out.numel(), name, indices, values)
    out.zero_()
    out.index_add_(0, indices, values.to(out.dtype))


def _check_sparse(numel: int, name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise ValueError(f"{name}{INDICES_SUFFIX} must be a 1-D int32/int64 tensor")
    if not values.dtype.is_floating_point or values.shape != indices.shape:
        raise ValueError(f"{name}{VALUES_SUFFIX} must be floating, one value per index")
    if indices.numel() > numel:
        raise ValueError(f"{name}: {indices.numel()} indices for {numel} elements")
    if indices.numel():
        low, high = torch.aminmax(indices)
        if int(low) < 0 or int(high) >= numel:
            raise ValueError(f"{name}: indices {int(low)}..{int(high)} are not all in [0, {numel})")


def decode_push_into(
    outs: Sequence[torch.Tensor],
    names: Sequence[str],
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    sparse: bool,
) -> None:
    """Decode one push's tensors into ``outs``, the full slices named ``names`` (in order).

    Raises:
        ValueError: the push does not carry exactly those slices in that encoding.
    """
    received = [name for name, _ in tensors]
    if sparse:
        suffixes = (INDICES_SUFFIX, VALUES_SUFFIX)
        expected = [f"{name}{suffix}" for name in names for suffix in suffixes]
    else:
        expected = list(names)
    if received != expected:
        raise ValueError(f"push must carry {expected}, got {received}")
    for i, (out, name) in enumerate(zip(outs, names, strict=True)):
        if sparse:
            decode_sparse_into(out, name, tensors[2 * i][1], tensors[2 * i + 1][1])
        elif tensors[i][1] is not out:
            decode_dense_into(out, name, tensors[i][1])


def apply_changes_into(
    outs: Sequence[torch.Tensor],
    names: Sequence[str],
    tensors: Sequence[tuple[str, torch.Tensor]],
) -> None:
    """Write a changes-only pull's values at their indices into ``outs``, the full slices
    named ``names`` (in order); the other elements keep their values.

    Raises:
        ValueError: the reply does not carry exactly those slices' indices and values, or
            they do not fit.
    """
    expected = [f"{name}{suffix}" for name in names for suffix in (INDICES_SUFFIX, VALUES_SUFFIX)]
    if [name for name, _ in tensors] != expected:
        raise ValueError(f"a pull of changes must carry {expected}, got {[n for n, _ in tensors]}")
    for i, (out, name) in enumerate(zip(outs, names, strict=True)):
        indices, values = tensors[2 * i][1], tensors[2 * i + 1][1]
        _check_sparse(out.numel(), name, indices, values)
        out.index_copy_(0, indices.long(), values.to(out.dtype))
