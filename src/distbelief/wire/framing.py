"""Reading and writing frames on a connected socket: the only code that parses wire bytes.

Tensor bytes are received straight into caller-provided buffers (``recv_into``), so a shard or a
worker reuses the same memory for every push and pull instead of allocating per message.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import torch

from distbelief.errors import ProtocolError
from distbelief.wire.dtypes import dtype_from_name, dtype_name
from distbelief.wire.message import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    HEADER,
    MAGIC,
    MAX_META_BYTES,
    PROTOCOL_VERSION,
    Message,
    Op,
)
from distbelief.wire.security import AUTH_MAGIC

Sink = Callable[[str, torch.dtype, tuple[int, ...]], "torch.Tensor | None"]
"""Picks the buffer a received tensor is read into; None means allocate a new one."""

SinkFactory = Callable[[Message], "Sink | None"]
"""Picks the sink for a frame, given its op and metadata (its tensors are not read yet)."""

_SMALL_FRAME_BYTES = 64 * 1024
_SKIP_CHUNK_BYTES = 1024 * 1024


class RejectedFrame(ProtocolError):
    """A well-framed message whose content was refused; the stream is still in sync."""

    def __init__(self, message: Message, reason: Exception) -> None:
        super().__init__(str(reason))
        self.message = message
        self.reason = reason


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (copies only if it is not contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _set_deadline(sock: socket.socket, deadline: float | None) -> None:
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(remaining)


def send_message(sock: socket.socket, message: Message, deadline: float | None = None) -> int:
    """Write one frame; returns the bytes written. Raises OSError/TimeoutError from the socket."""
    descriptors, buffers = [], []
    for name, tensor in message.tensors:
        descriptors.append([name, dtype_name(tensor.dtype), list(tensor.shape)])
        buffers.append(tensor_bytes(tensor))
    meta = dict(message.meta)
    if descriptors:
        meta["tensors"] = descriptors
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
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
    _set_deadline(sock, deadline)
    if payload_bytes <= _SMALL_FRAME_BYTES:
        # One write for small frames: with TCP_NODELAY every write is its own segment.
        sock.sendall(b"".join([header, meta_bytes, *buffers]))
    else:
        sock.sendall(header + meta_bytes)
        for buf in buffers:
            _set_deadline(sock, deadline)
            sock.sendall(buf)
    return HEADER.size + len(meta_bytes) + payload_bytes


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    received, total = 0, view.nbytes
    while received < total:
        _set_deadline(sock, deadline)
        count = sock.recv_into(view[received:], total - received)
        if count == 0:
            raise ConnectionResetError("peer closed the connection mid-frame")
        received += count


def _recv_exact(sock: socket.socket, num_bytes: int, deadline: float | None) -> bytearray:
    buf = bytearray(num_bytes)
    _recv_into(sock, memoryview(buf), deadline)
    return buf


def _skip(sock: socket.socket, num_bytes: int, deadline: float | None) -> None:
    scratch = memoryview(bytearray(min(num_bytes, _SKIP_CHUNK_BYTES)))
    while num_bytes > 0:
        chunk = min(num_bytes, scratch.nbytes)
        _recv_into(sock, scratch[:chunk], deadline)
        num_bytes -= chunk


def parse_header(raw: bytes | bytearray, max_payload_bytes: int) -> tuple[Op, int, int, int, int]:
    """Validate a header; returns (op, flags, request_id, meta_bytes, payload_bytes)."""
    magic, version, op, flags, request_id, meta_len, payload_len = HEADER.unpack(raw)
    if magic == AUTH_MAGIC:
        raise ProtocolError("the shard requires authentication: give the job's key")
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not a distbelief peer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} (this side speaks {PROTOCOL_VERSION})")
    try:
        op = Op(op)
    except ValueError:
        raise ProtocolError(f"unknown op {op}") from None
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"metadata of {meta_len} bytes exceeds {MAX_META_BYTES}")
    if payload_len > max_payload_bytes:
        raise ProtocolError(f"payload of {payload_len} bytes exceeds {max_payload_bytes}")
    return op, flags, request_id, meta_len, payload_len


def _parse_descriptors(meta: dict, payload_len: int) -> list[tuple[str, torch.dtype, tuple]]:
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
        numel = 1
        for size in shape:
            numel *= size
        total += numel * dtype.itemsize
        descriptors.append((name, dtype, tuple(shape)))
    if total != payload_len:
        raise ProtocolError(f"tensors describe {total} bytes but the payload has {payload_len}")
    return descriptors


def _receive_tensor(sock, name, dtype, shape, sink, deadline) -> torch.Tensor:
    target = sink(name, dtype, shape) if sink is not None else None
    if target is None:
        target = torch.empty(shape, dtype=dtype)
    elif target.dtype != dtype or tuple(target.shape) != shape or not target.is_contiguous():
        raise ProtocolError(f"tensor {name!r}: buffer does not fit {dtype} {list(shape)}")
    if target.numel():
        _recv_into(sock, tensor_bytes(target), deadline)
    return target


def recv_message(
    sock: socket.socket,
    *,
    sink_for: SinkFactory | None = None,
    deadline: float | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    prefix: bytes = b"",
) -> Message:
    """Read one frame (``prefix``: its first bytes, already read by the caller).

    Raises:
        ProtocolError: the header is invalid (the stream is unusable afterwards).
        RejectedFrame: the frame was read in full but its metadata or tensors were refused.
        ConnectionResetError: the peer closed the connection mid-frame.
        TimeoutError: ``deadline`` passed.
    """
    op, flags, request_id, meta_len, payload_len = parse_header(
        prefix + _recv_exact(sock, HEADER.size - len(prefix), deadline), max_payload_bytes
    )
    message = Message(op, {}, [], request_id, flags)
    try:
        meta = json.loads(bytes(_recv_exact(sock, meta_len, deadline)) or b"{}")
        if not isinstance(meta, dict):
            raise ProtocolError("metadata must be a JSON object")
        message.meta = meta
        descriptors = _parse_descriptors(meta, payload_len)
        sink = sink_for(message) if sink_for is not None else None
    except (ValueError, ProtocolError) as e:
        _skip(sock, payload_len, deadline)
        raise RejectedFrame(message, e) from e
    received = 0
    for name, dtype, shape in descriptors:
        try:
            tensor = _receive_tensor(sock, name, dtype, shape, sink, deadline)
        except (ValueError, ProtocolError) as e:
            _skip(sock, payload_len - received, deadline)
            raise RejectedFrame(message, e) from e
        received += tensor.numel() * dtype.itemsize
        message.tensors.append((name, tensor))
    return message
