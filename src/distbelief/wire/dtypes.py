"""The dtypes that travel on the wire, and their names there.

The tables are built at the first tensor that travels: a process whose frames carry none (the
launcher polling its shards' counters) never imports torch for them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from distbelief.errors import ProtocolError

if TYPE_CHECKING:
    import torch

_WIRE_NAMES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
"""The wire's dtype names: each is also the name of the dtype in torch."""


@functools.cache
def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    by_name = {name: getattr(torch, name) for name in _WIRE_NAMES}
    return by_name, {dtype: name for name, dtype in by_name.items()}


def __getattr__(name: str) -> tuple[torch.dtype, ...]:
    if name == "WIRE_DTYPES":  # every dtype that can travel, in wire-name order
        return tuple(_tables()[0].values())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; ValueError if it cannot travel."""
    try:
        return _tables()[1][dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported on the wire") from None


def dtype_from_name(name: object) -> torch.dtype:
    """The dtype called ``name`` on the wire; ProtocolError for an unknown name."""
    by_name = _tables()[0]
    if not isinstance(name, str) or name not in by_name:
        raise ProtocolError(f"unknown dtype {name!r}")
    return by_name[name]
