"""A model's parameters as flat vectors: specs, the per-dtype flat buffers and their slices.

Parameters are grouped by dtype and each group is viewed as one flat vector (tensors concatenated
in model order). Which slices of those vectors each shard owns is a partitioner's job
(``partitioner.py``); this module only names the pieces and moves tensors in and out of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from distbelief.wire.dtypes import dtype_from_name, dtype_name


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, shape and dtype of one parameter tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Elements in the tensor."""
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True, slots=True)
class ShardSlice:
    """Elements ``[start, stop)`` of the flat vector of all parameters of one dtype."""

    dtype: torch.dtype
    start: int
    stop: int

    @property
    def numel(self) -> int:
        """Elements in the slice."""
        return self.stop - self.start

    @property
    def name(self) -> str:
        """The tensor name this slice travels under on the wire."""
        return f"{dtype_name(self.dtype)}[{self.start}:{self.stop}]"


COMPILED_WRAPPER_ATTRIBUTE = "_orig_mod"
"""Where torch.compile's wrapper module keeps the module it compiles: a component of every name
the wrapper lists (``_orig_mod.0.weight``), and of no name in the model itself."""


def uncompiled_name(name: str) -> str:
    """A parameter's or module's ``name`` as the model itself names it, without the components
    torch.compile's wrappers add (``_orig_mod.0.weight`` -> ``0.weight``): a compiled replica
    and a plain one (or an evaluator) then name each tensor and table alike."""
    return ".".join(part for part in name.split(".") if part != COMPILED_WRAPPER_ATTRIBUTE)


def tensor_specs(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    """Specs of ``(name, tensor)`` pairs, in order, each named as the model itself names it
    (``uncompiled_name``); names must be unique."""
    specs = [
        TensorSpec(uncompiled_name(name), tuple(t.shape), t.dtype) for name, t in named_tensors
    ]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"parameter name {duplicate!r} appears twice")
    return specs


def group_sizes(specs: Sequence[TensorSpec]) -> dict[torch.dtype, int]:
    """Elements per dtype, in order of first appearance (the order of every shard's slices)."""
    sizes: dict[torch.dtype, int] = {}
    for spec in specs:
        sizes[spec.dtype] = sizes.get(spec.dtype, 0) + spec.numel
    return sizes


class FlatLayout:
    """One flat buffer per dtype and per-parameter views into it.

    Args:
        specs: The parameters, in model order.
    """

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = list(specs)
        self.sizes = group_sizes(self.specs)
        self._offsets: list[int] = []
        running: dict[torch.dtype, int] = dict.fromkeys(self.sizes, 0)
        for spec in self.specs:
            self._offsets.append(running[spec.dtype])
            running[spec.dtype] += spec.numel

    def allocate(self) -> dict[torch.dtype, torch.Tensor]:
        """Zeroed flat buffers, one per dtype."""
        return {dtype: torch.zeros(total, dtype=dtype) for dtype, total in self.sizes.items()}

    def views(self, flats: dict[torch.dtype, torch.Tensor]) -> list[torch.Tensor]:
        """Views of ``flats`` shaped like each parameter, in spec order (no copy)."""
        return [
            flats[spec.dtype][offset : offset + spec.numel].view(spec.shape)
            for spec, offset in zip(self.specs, self._offsets, strict=True)
        ]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
        """New flat buffers holding copies of ``tensors`` (one per spec)."""
        flats = self.allocate()
        torch._foreach_copy_(self.views(flats), [t.detach().cpu() for t in tensors])
        return flats


def specs_to_json(specs: Sequence[TensorSpec]) -> list[list[object]]:
    """A JSON-able form of ``specs`` for the wire."""
    return [[spec.name, list(spec.shape), dtype_name(spec.dtype)] for spec in specs]


def specs_from_json(raw: object) -> list[TensorSpec]:
    """Inverse of :func:`specs_to_json`; raises ValueError on anything malformed."""
    if not isinstance(raw, list):
        raise ValueError("tensor specs must be a list")
    specs = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise ValueError(f"malformed tensor spec {item!r}")
        name, shape, dtype = item
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"tensor {name!r}: malformed shape {shape!r}")
        specs.append(TensorSpec(name, tuple(shape), dtype_from_name(dtype)))
    return specs


def layout_fingerprint(specs: Sequence[TensorSpec]) -> str:
    """A short digest of names, shapes and dtypes: equal for equal models."""
    text = json.dumps(specs_to_json(specs), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_RENAMED = (
    " (the same tensor by another name: a DownpourSGD names its parameters as its model= does, "
    "else as named_parameters() gave them where no name repeats, else param.I by position)"
)
"""Said of a tensor that differs from the shards' by its name alone."""


def describe_mismatch(
    expected: Sequence[TensorSpec], actual: Sequence[TensorSpec], *, client: bool = False
) -> str:
    """A sentence naming the first tensor that differs between two layouts; of a ``client``'s
    (a DownpourSGD's, say), one that differs by its name alone says how it was named."""
    for want, got in zip(expected, actual, strict=False):
        if want != got:
            renamed = (want.shape, want.dtype) == (got.shape, got.dtype)
            return (
                f"tensor {got.name!r} {list(got.shape)} {dtype_name(got.dtype)} does not match "
                f"the shards' {want.name!r} {list(want.shape)} {dtype_name(want.dtype)}"
                + (_RENAMED if renamed and client else "")
            )
    if len(expected) != len(actual):
        return f"the model has {len(actual)} parameter tensors, the shards hold {len(expected)}"
    return "layouts are equal"


def matched_to_model(model: Sequence[TensorSpec], specs: Sequence[TensorSpec]) -> list[int] | None:
    """For each of a client's ``specs``, the position of the ``model`` tensor it stands for: by
    name where every one names one of ``model``'s (a client may leave frozen parameters out),
    else by position (a client that gave no names); None where neither can be (by position,
    another number of tensors). Shapes and dtypes are not compared (``describe_misfit``)."""
    position = {spec.name: at for at, spec in enumerate(model)}
    if all(spec.name in position for spec in specs):
        return [position[spec.name] for spec in specs]
    return list(range(len(model))) if len(specs) == len(model) else None


def describe_misfit(model: Sequence[TensorSpec], specs: Sequence[TensorSpec]) -> str | None:
    """Why a client's layout ``specs`` cannot be parameters of ``model`` (a sentence naming the
    first tensor that does not fit), or None when it can, matched as ``matched_to_model``
    matches them."""
    positions = matched_to_model(model, specs)
    # Of another number of tensors, still compared by position first: a tensor that differs
    # says more than the count.
    paired = range(min(len(specs), len(model))) if positions is None else positions
    for got, at in zip(specs, paired, strict=False):
        want = model[at]
        if (want.shape, want.dtype) != (got.shape, got.dtype):
            return (
                f"tensor {got.name!r} {list(got.shape)} {dtype_name(got.dtype)} does not match "
                f"the server's model's {want.name!r} {list(want.shape)} {dtype_name(want.dtype)}"
            )
    if positions is None:
        return f"the model has {len(specs)} parameter tensors, the server's model {len(model)}"
    return None
