"""The dtypes that travel on the wire, and their names there."""

from __future__ import annotations

import torch

from distbelief.errors import ProtocolError

_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_BY_DTYPE = {dtype: name for name, dtype in _BY_NAME.items()}

WIRE_DTYPES: tuple[torch.dtype, ...] = tuple(_BY_NAME.values())


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; ValueError if it cannot travel."""
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported on the wire") from None


def dtype_from_name(name: object) -> torch.dtype:
    """The dtype called ``name`` on the wire; ProtocolError for an unknown name."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ProtocolError(f"unknown dtype {name!r}")
    return _BY_NAME[name]
