"""Writing frames, and checking the ones read: with reader.py, the only code that touches wire
bytes.

A small frame leaves in one write; a large one as its header and metadata, then each tensor's
bytes straight from the tensor's memory.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from distbelief.errors import (
    AuthenticationError,
    NotAPeerError,
    ProtocolError,
    TLSMismatchError,
)
from distbelief.wire.dtypes import dtype_from_name, dtype_name
from distbelief.wire.message import HEADER, MAGIC, MAX_META_BYTES, PROTOCOL_VERSION, Message
from distbelief.wire.ops import Op, op_for_code
from distbelief.wire.security import AUTH_MAGIC, SHARD_SPEAKS_TLS, TLS_MAGIC

if TYPE_CHECKING:
    import torch

    from distbelief.wire.channels import Channel

Sink = Callable[[str, "torch.dtype", tuple[int, ...]], "torch.Tensor | None"]
"""Picks the buffer a received tensor is read into; None means allocate a new one."""

SinkFactory = Callable[[Message], "Sink | None"]
"""Picks the sink for a frame, given its op and metadata (its tensors are not read yet)."""

_SMALL_FRAME_BYTES = 64 * 1024
_MAX_SPAN = (1 << 63) - 1
"""The most elements a tensor's shape may span, its zero sizes counted as 1 (torch's strides
are 64-bit)."""


@functools.cache
def _numpy_dtypes() -> frozenset[torch.dtype]:
    """Dtypes whose tensors convert to numpy arrays directly (bfloat16, for one, does not).
    Made at the first tensor sent: torch is loaded by then (frames without tensors need none)."""
    import torch

    return frozenset(
        {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16}
        | {torch.int8, torch.uint8, torch.bool}
    )


class RejectedFrame(ProtocolError):
    """A well-framed message whose content was refused; the stream is still in sync."""

    def __init__(self, message: Message, reason: Exception) -> None:
        super().__init__(str(reason))
        self.message = message
        self.reason = reason


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (copies only if it is not contiguous)."""
    if (
        tensor.is_cpu
        and tensor.dtype in _numpy_dtypes()
        and tensor.is_contiguous()
        and tensor.numel()  # memoryview cannot cast a shape with a zero in it
    ):
        # The common case, in one numpy call instead of five tensor calls (per frame).
        return memoryview(tensor.detach().numpy()).cast("B")
    import torch  # loaded already: ``tensor`` is one of its tensors

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def check_deadline(deadline: float | None) -> None:
    # Each call is bounded by the channel's own timeout, set once per connection; the frame's
    # deadline is checked between calls, so no timeout syscall is made per call.
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError("deadline passed")


def send_message(channel: Channel, message: Message, deadline: float | None = None) -> int:
    """Write one frame; returns the bytes written. Raises OSError/TimeoutError from the channel.

    Every call on ``channel`` must already be bounded (``settimeout``).
    """
    descriptors, buffers = [], []
    for name, tensor in message.tensors:
        descriptors.append([name, dtype_name(tensor.dtype), list(tensor.shape)])
        buffers.append(tensor_bytes(tensor))
    meta = dict(message.meta)
    if descriptors:
        meta["tensors"] = descriptors
    # orjson: ~15x faster than the standard library's json, which was a tenth of a request.
    meta_bytes = orjson.dumps(meta)
    payload_bytes = sum(buf.nbytes for buf in buffers)
    header = HEADER.pack(
        MAGIC,
        PROTOCOL_VERSION,
        int(message.op),
        message.flags,
        message.request_id,
        len(meta_bytes),
        payload_bytes,
    )
    check_deadline(deadline)
    if payload_bytes <= _SMALL_FRAME_BYTES:
        # One write for small frames: with TCP_NODELAY every write is its own segment.
        channel.sendall(b"".join([header, meta_bytes, *buffers]))
    else:
        channel.sendall(header + meta_bytes)
        for buf in buffers:
            check_deadline(deadline)
            channel.sendall(buf)
    return HEADER.size + len(meta_bytes) + payload_bytes


def parse_header(
    raw: bytes | bytearray, max_payload_bytes: int
) -> tuple[Op | int, int, int, int, int]:
    """Validate a header; returns (op, flags, request_id, meta_bytes, payload_bytes).

    ``op`` is the defined op, or the bare code when no op is defined with it here: such a frame
    is still well framed, so the reader skips and refuses it and the stream stays usable.

    Raises:
        AuthenticationError: the bytes are a keyed shard's challenge, or a TLS shard's notice
            (TLSMismatchError) to a peer that does not speak TLS.
        NotAPeerError: the bytes are not a frame of this protocol (another program's).
        ProtocolError: another protocol version, or too large (the stream is unusable).
    """
    magic, version, code, flags, request_id, meta_len, payload_len = HEADER.unpack(raw)
    if magic == AUTH_MAGIC:
        raise AuthenticationError("the shard requires authentication: give the job's key")
    if magic == TLS_MAGIC:
        raise TLSMismatchError(SHARD_SPEAKS_TLS)
    if magic != MAGIC:
        raise NotAPeerError(f"bad magic {bytes(magic)!r}: not a distbelief peer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} (this side speaks {PROTOCOL_VERSION})")
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"metadata of {meta_len} bytes exceeds {MAX_META_BYTES}")
    if payload_len > max_payload_bytes:
        raise ProtocolError(f"payload of {payload_len} bytes exceeds {max_payload_bytes}")
    op = op_for_code(code)
    return code if op is None else op, flags, request_id, meta_len, payload_len


def parse_descriptors(meta: dict, payload_len: int) -> list[tuple[str, torch.dtype, tuple]]:
    raw = meta.pop("tensors", [])
    if not isinstance(raw, list):
        raise ProtocolError("'tensors' must be a list")
    descriptors, total = [], 0
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise ProtocolError(f"malformed tensor descriptor {item!r}")
        name, dtype_text, shape = item
        dtype = dtype_from_name(dtype_text)
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ProtocolError(f"tensor {name!r}: malformed shape {shape!r}")
        numel, span = 1, 1
        for size in shape:
            numel *= size
            span *= max(size, 1)
        if span > _MAX_SPAN:  # an empty tensor too: its strides would overflow
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} is too large")
        total += numel * dtype.itemsize
        descriptors.append((name, dtype, tuple(shape)))
    if total != payload_len:
        raise ProtocolError(f"tensors describe {total} bytes but the payload has {payload_len}")
    return descriptors
