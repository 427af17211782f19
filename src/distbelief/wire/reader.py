"""Receiving frames: one connection's read side, through a small buffer.

A frame's header and metadata are small and arrive together, usually with the whole frame: one
receive into a per-connection buffer fetches all of them (reading them separately cost a
syscall each). Tensor bytes go straight into caller-provided buffers: what the first receive
already fetched is copied over, the rest is received in place. Bytes of a following frame (a
peer that pipelines requests) stay buffered for the next read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from distbelief.errors import ProtocolError, UnknownOpError
from distbelief.wire.framing import (
    RejectedFrame,
    SinkFactory,
    check_deadline,
    parse_descriptors,
    parse_header,
    tensor_bytes,
)
from distbelief.wire.message import DEFAULT_MAX_PAYLOAD_BYTES, HEADER, Message
from distbelief.wire.ops import Op

if TYPE_CHECKING:
    import torch

    from distbelief.wire.channels import Channel

BUFFER_BYTES = 4096
"""Room for a header and typical metadata. Larger measured slower for 4 MB pulls: whatever the
first receive fetched past the metadata has to be copied into the tensor afterwards."""
_SKIP_CHUNK_BYTES = 1024 * 1024


class FrameReader:
    """Reads frames from one connected channel (not thread-safe: one reader per connection).

    Every call on the channel must already be bounded (``settimeout``).
    """

    def __init__(self, channel: Channel, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.channel = channel
        self._buffer = bytearray(buffer_bytes)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not read yet."""
        return self._end - self._start

    def _receive_some(self) -> int:
        """One receive into the buffer's free end; the bytes read (0: the peer closed)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):
            self._compact()
        count = self.channel.recv_into(self._view[self._end :])
        self._end += count
        return count

    def _compact(self) -> None:
        kept = self.buffered
        self._buffer[:kept] = self._buffer[self._start : self._end]
        self._start, self._end = 0, kept

    def wait_for_frame(self) -> bool:
        """Block until a frame has started to arrive; False if the peer closed in between.

        Raises:
            TimeoutError: nothing arrived within the channel's timeout (an idle peer).
        """
        return self.buffered > 0 or self._receive_some() > 0

    def _take(self, num_bytes: int, deadline: float | None) -> bytearray:
        """A copy of the next ``num_bytes`` (at most the buffer's size)."""
        start = self._start
        if self._end - start < num_bytes:
            if start + num_bytes > len(self._buffer):
                self._compact()
            while self._end - self._start < num_bytes:
                if self._receive_some() == 0:
                    raise ConnectionResetError("peer closed the connection mid-frame")
                if self._end - self._start < num_bytes:
                    check_deadline(deadline)
            start = self._start
        self._start = start + num_bytes
        return self._buffer[start : start + num_bytes]

    def read_into(self, view: memoryview, deadline: float | None) -> None:
        """Fill ``view``: buffered bytes first, the rest received in place."""
        copied = min(self._end - self._start, view.nbytes)
        if copied:
            view[:copied] = self._view[self._start : self._start + copied]
            self._start += copied
        received, total = copied, view.nbytes
        while received < total:
            count = self.channel.recv_into(view[received:], total - received)
            if count == 0:
                raise ConnectionResetError("peer closed the connection mid-frame")
            received += count
            if received < total:
                check_deadline(deadline)

    def read_bytes(self, num_bytes: int, deadline: float | None) -> bytearray:
        if num_bytes <= len(self._buffer):
            return self._take(num_bytes, deadline)
        data = bytearray(num_bytes)
        self.read_into(memoryview(data), deadline)
        return data

    def skip(self, num_bytes: int, deadline: float | None) -> None:
        """Read and drop ``num_bytes`` (a refused frame's payload), keeping the stream in sync."""
        scratch = memoryview(bytearray(min(num_bytes, _SKIP_CHUNK_BYTES)))
        while num_bytes > 0:
            chunk = min(num_bytes, scratch.nbytes)
            self.read_into(scratch[:chunk], deadline)
            num_bytes -= chunk


def _receive_tensor(reader, name, dtype, shape, sink, deadline) -> torch.Tensor:
    target = sink(name, dtype, shape) if sink is not None else None
    if target is None:
        import torch  # the frame describes a tensor: loaded at its dtype's lookup

        target = torch.empty(shape, dtype=dtype)
    elif target.dtype != dtype or tuple(target.shape) != shape or not target.is_contiguous():
        raise ProtocolError(f"tensor {name!r}: buffer does not fit {dtype} {list(shape)}")
    if target.numel():
        reader.read_into(tensor_bytes(target), deadline)
    return target


def recv_message(
    reader: FrameReader,
    *,
    sink_for: SinkFactory | None = None,
    deadline: float | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Message:
    """Read one frame.

    Raises:
        ProtocolError: the header is invalid (the stream is unusable afterwards).
        RejectedFrame: the frame was read in full but its op, metadata or tensors were refused.
        ConnectionResetError: the peer closed the connection mid-frame.
        TimeoutError: ``deadline`` passed, or the channel's timeout.
    """
    op, flags, request_id, meta_len, payload_len = parse_header(
        reader.read_bytes(HEADER.size, deadline), max_payload_bytes
    )
    if not isinstance(op, Op):
        # A peer that defines more ops than this process (a capability not loaded here).
        reader.skip(meta_len + payload_len, deadline)
        refused = Message(Op(f"op code {op}", op), {}, [], request_id, flags)
        raise RejectedFrame(refused, UnknownOpError(f"unknown op code {op}"))
    message = Message(op, {}, [], request_id, flags)
    try:
        meta = orjson.loads(reader.read_bytes(meta_len, deadline) or b"{}")
        if not isinstance(meta, dict):
            raise ProtocolError("metadata must be a JSON object")
        message.meta = meta
        descriptors = parse_descriptors(meta, payload_len)
        sink = sink_for(message) if sink_for is not None else None
    except (ValueError, ProtocolError) as e:
        reader.skip(payload_len, deadline)
        raise RejectedFrame(message, e) from e
    received = 0
    for name, dtype, shape in descriptors:
        try:
            tensor = _receive_tensor(reader, name, dtype, shape, sink, deadline)
        except (ValueError, ProtocolError) as e:
            reader.skip(payload_len - received, deadline)
            raise RejectedFrame(message, e) from e
        received += tensor.numel() * dtype.itemsize
        message.tensors.append((name, tensor))
    return message
