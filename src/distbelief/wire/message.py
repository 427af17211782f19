"""The message schema: a fixed binary header, a small JSON metadata part, raw tensor bytes.

Frame layout (network byte order)::

    magic "DBLF" | version u8 | op u8 | flags u16 | request_id u64 | meta_bytes u32
    | payload_bytes u64
    meta: UTF-8 JSON object; its "tensors" entry lists [name, dtype, shape] per tensor
    payload: the tensors' raw bytes, concatenated in that order
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distbelief.wire.ops import Op

if TYPE_CHECKING:
    import torch

MAGIC = b"DBLF"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sBBHQIQ")

MAX_META_BYTES = 4 * 1024 * 1024
"""Upper bound on the JSON part of any frame."""

DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024**3
"""Upper bound on the tensor part of a frame unless a server sets a tighter one."""

FLAG_REPLY = 0x1
FLAG_ERROR = 0x2


@dataclass(slots=True)
class Message:
    """One frame. ``tensors`` are (name, tensor) pairs; their descriptors live in the header."""

    op: Op
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    request_id: int = 0
    flags: int = 0

    @property
    def is_error(self) -> bool:
        """Whether this is an error reply."""
        return bool(self.flags & FLAG_ERROR)

    def reply(self, meta: dict[str, Any] | None = None, tensors=None) -> Message:
        """A success reply to this request."""
        return Message(self.op, meta or {}, list(tensors or []), self.request_id, FLAG_REPLY)

    def error_reply(self, kind: str, text: str) -> Message:
        """An error reply to this request; ``kind`` picks the exception the client raises."""
        meta = {"error": kind, "message": text}
        return Message(self.op, meta, [], self.request_id, FLAG_REPLY | FLAG_ERROR)
