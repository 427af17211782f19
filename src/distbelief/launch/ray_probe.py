"""Whether a Ray head answers at an address, told within a bounded time over one plain socket:
the HTTP/2 preface (a head's GCS is a gRPC server), then one call that only the GCS serves
(``NodeInfoGcsService/GetClusterId``), whose gRPC status tells a head from another server.
Ray's own client retries a silent or foreign server for minutes. Knows nothing else of Ray and
imports none of it, nor any gRPC library: the few HTTP/2 and HPACK pieces a call needs are here.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

GRPC_UNIMPLEMENTED = 12
GRPC_UNAUTHENTICATED = 16
GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
"""A call of the GCS that any client of the cluster may make (Ray's own driver makes it
first); its request is empty."""

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY, _CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x7, 0x9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_FRAME_HEADER_BYTES = 9
_STREAM = 1
_STATIC_TABLE_SIZE = 61
"""HPACK's static table (RFC 7541, appendix A) names none of gRPC's fields: its size matters
here, where the dynamic table's indices start, and its ``:status`` entries."""
_STATIC_STATUSES = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}
"""The static table's ``:status`` entries by index: a gRPC server always answers 200, a web
server or proxy on the port often another."""
_MAX_REPLY_BYTES = 1 << 16
_EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"  # gRPC's framing of an empty protobuf: no compression


@dataclass(frozen=True)
class GcsAnswer:
    """How the server at the address answered the call."""

    status: int | None
    """Its gRPC status (0: a Ray head answered); None where the reply does not say it in a
    form read here."""
    message: str
    """Its ``grpc-message``, if any."""


def ask_gcs(host: str, port: int, *, headers: dict[str, str], timeout_s: float) -> GcsAnswer:
    """Calls ``GCS_METHOD`` at ``host:port`` with ``headers`` (Ray's token, say).

    Raises:
        ConnectionError: no gRPC server answers the call within ``timeout_s``: it answered
            something else (an HTTP/1 server, or an HTTP/2 one whose reply is no gRPC status:
            HTTP's 404, say), closed the connection, or stayed silent;
            the message says what was seen.
        OSError: the connection cannot be made (``strerror`` says why), or not within
            ``timeout_s`` (TimeoutError).
    """
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(_PREFACE + _frame(_SETTINGS, 0, 0, b"") + _request(f"{host}:{port}", headers))
        reader = _FrameReader(sock, time.monotonic() + timeout_s, timeout_s)
        kind, _, stream, _ = reader.first_frame()
        if kind != _SETTINGS or stream != 0:
            raise ConnectionError(f"it answered, but not as a gRPC server: {reader.seen()}")
        sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
        fields = _read_reply(reader)
    http_status = fields.get(":status")
    if http_status not in (None, "200"):
        raise ConnectionError(
            f"it answered the call with HTTP status {http_status}, not as a gRPC server"
        )
    status = fields.get("grpc-status") or ""
    return GcsAnswer(int(status) if status.isdigit() else None, fields.get("grpc-message") or "")


def _read_reply(reader: _FrameReader) -> dict[str, str | None]:
    """The header fields of the call's reply (its headers and trailers), read to its end."""
    fields: dict[str, str | None] = {}
    table: list[tuple[str | None, str | None]] = []
    block, ended = b"", False
    while True:
        kind, flags, stream, payload = reader.next_frame()
        if kind == _GOAWAY:
            raise ConnectionError("it closed the HTTP/2 connection (GOAWAY) instead of answering")
        if stream != _STREAM:
            continue
        if kind == _RST_STREAM:
            raise ConnectionError("it reset the call (HTTP/2 RST_STREAM) instead of answering")
        if kind in (_HEADERS, _CONTINUATION):
            block += _header_block(kind, flags, payload)
            if flags & _END_HEADERS:
                for name, value in _decode_fields(block, table):
                    if name is not None:
                        fields[name] = value
                block = b""
        ended = ended or (kind in (_HEADERS, _DATA) and bool(flags & _END_STREAM))
        if ended and not block:
            return fields


class _FrameReader:
    """HTTP/2 frames off a socket, each by the one deadline."""

    def __init__(self, sock: socket.socket, deadline: float, timeout_s: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._buffer = b""
        self._consumed = 0
        self._framed = False

    def seen(self) -> str:
        """What the server sent first, as text: its first line, shortened."""
        line = self._buffer.split(b"\n", 1)[0][:40].strip()
        return repr(line.decode("ascii", "backslashreplace"))

    def first_frame(self) -> tuple[int, int, int, bytes]:
        header = self._take(_FRAME_HEADER_BYTES)
        if header[3] != _SETTINGS:  # not HTTP/2: its payload's length means nothing
            return header[3], header[4], 0, b""
        return self._frame(header)

    def next_frame(self) -> tuple[int, int, int, bytes]:
        return self._frame(self._take(_FRAME_HEADER_BYTES))

    def _frame(self, header: bytes) -> tuple[int, int, int, bytes]:
        self._framed = True
        length = int.from_bytes(header[:3], "big")
        stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        return header[3], header[4], stream, self._take(length)

    def _take(self, count: int) -> bytes:
        while len(self._buffer) - self._consumed < count:
            self._receive()
        data = self._buffer[self._consumed : self._consumed + count]
        self._consumed += count
        return data

    def _receive(self) -> None:
        if len(self._buffer) > _MAX_REPLY_BYTES:
            raise ConnectionError(f"it sent {len(self._buffer)} bytes without answering the call")
        self._sock.settimeout(max(0.0, self._deadline - time.monotonic()))
        try:
            chunk = self._sock.recv(1 << 14)
        except TimeoutError:
            raise ConnectionError(self._silent(f"within {self._timeout_s:g} s")) from None
        if not chunk:
            raise ConnectionError(self._silent("before it closed the connection"))
        self._buffer += chunk

    def _silent(self, until: str) -> str:
        if self._framed:
            return f"it speaks HTTP/2 but did not answer a call to Ray's GCS {until}"
        if self._buffer:
            return f"it answered, but not as a gRPC server: {self.seen()}"
        return f"it accepted the connection but sent nothing {until}"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def _request(authority: str, headers: dict[str, str]) -> bytes:
    """The call's HEADERS and DATA frames: an empty request, then the end of the stream."""
    fields = {
        ":method": "POST",
        ":scheme": "http",
        ":path": GCS_METHOD,
        ":authority": authority,
        "content-type": "application/grpc",
        "te": "trailers",
        **{name.lower(): value for name, value in headers.items()},
    }
    # Literal fields without indexing, new names (0x00), strings not Huffman-coded.
    block = b"".join(b"\x00" + _string(name) + _string(value) for name, value in fields.items())
    return _frame(_HEADERS, _END_HEADERS, _STREAM, block) + _frame(
        _DATA, _END_STREAM, _STREAM, _EMPTY_MESSAGE
    )


def _string(text: str) -> bytes:
    data = text.encode()
    return _integer(len(data), 7) + data


def _integer(value: int, prefix_bits: int) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541, 5.1); the prefix's other bits are 0."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = [limit], value - limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def _header_block(kind: int, flags: int, payload: bytes) -> bytes:
    """A HEADERS or CONTINUATION frame's piece of the header block (padding and priority cut)."""
    if kind == _HEADERS and flags & _PADDED:
        payload = payload[1 : len(payload) - payload[0]]
    if kind == _HEADERS and flags & _PRIORITY:
        payload = payload[5:]
    return payload


def _decode_fields(
    block: bytes, table: list[tuple[str | None, str | None]]
) -> list[tuple[str | None, str | None]]:
    """The fields of an HPACK header block (RFC 7541, 6); a name or value that is
    Huffman-coded, or a static table's entry other than ``:status``, is None (none of those is
    read here).

    Raises:
        ConnectionError: the block is not HPACK.
    """
    fields: list[tuple[str | None, str | None]] = []
    position = 0
    try:
        while position < len(block):
            first = block[position]
            if first & 0x80:  # an indexed field
                index, position = _read_integer(block, position, 7)
                fields.append(_entry(table, index))
            elif first & 0xE0 == 0x20:  # a dynamic table size update
                _, position = _read_integer(block, position, 5)
            else:  # a literal, indexed (0x40) or not
                indexed = first & 0xC0 == 0x40
                index, position = _read_integer(block, position, 6 if indexed else 4)
                name = _entry(table, index)[0] if index else None
                if not index:
                    name, position = _read_string(block, position)
                value, position = _read_string(block, position)
                if indexed:
                    table.insert(0, (name, value))
                fields.append((name, value))
    except IndexError:
        raise ConnectionError(
            "it answered the call with header fields that are not HPACK"
        ) from None
    return fields


def _entry(table: list[tuple[str | None, str | None]], index: int) -> tuple[str | None, str | None]:
    if index in _STATIC_STATUSES:
        return ":status", _STATIC_STATUSES[index]
    if index <= _STATIC_TABLE_SIZE:
        return None, None
    return table[index - _STATIC_TABLE_SIZE - 1]


def _read_integer(block: bytes, position: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[position] & limit
    position += 1
    if value < limit:
        return value, position
    shift = 0
    while True:
        byte = block[position]
        position += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _read_string(block: bytes, position: int) -> tuple[str | None, int]:
    huffman = block[position] & 0x80
    length, position = _read_integer(block, position, 7)
    end = position + length
    if end > len(block):
        raise IndexError("a string past the block's end")
    return (None if huffman else block[position:end].decode("latin-1")), end
