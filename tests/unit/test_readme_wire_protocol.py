"""The README's "Wire protocol" section describes the frames the code writes: the header's size
and limits, the reply flags, the error reply's keys and every op's code. A client written from
that section alone must be able to talk to a shard."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from distbelief.wire import dtypes
from distbelief.wire.message import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    FLAG_ERROR,
    FLAG_REPLY,
    HEADER,
    MAGIC,
    MAX_META_BYTES,
    PROTOCOL_VERSION,
    Message,
)
from distbelief.wire.ops import PUSH, Op

README = Path(__file__).resolve().parents[2] / "README.md"
OP_MODULES = (
    "distbelief.wire.ops",
    "distbelief.coordinator.protocol",
    "distbelief.pipeline.stage_protocol",
    "distbelief.wire.row_ops",
    "distbelief.wire.warmstart_ops",
)
"""The modules that define the project's ops (tests define ops of their own)."""


def wire_section() -> str:
    text = README.read_text()
    start = text.index("## Wire protocol")
    return text[start : text.index("\n## ", start + 1)]


def test_the_header_is_as_the_readme_says():
    section = wire_section()
    assert f"{HEADER.size}-byte header in network byte order" in section
    assert HEADER.format.startswith("!")
    assert f"magic `{MAGIC.decode()}`" in section
    assert f"now\n{PROTOCOL_VERSION}" in section or f"now {PROTOCOL_VERSION}" in section
    assert f"at most {MAX_META_BYTES // 1024**2} MiB" in section
    assert f"at most {DEFAULT_MAX_PAYLOAD_BYTES // 1024**3} GiB" in section
    assert f"{FLAG_REPLY:#x} a reply, {FLAG_ERROR:#x} an error" in section


def test_every_wire_dtype_is_listed():
    listed = re.search(r"dtype one of (.*?)\) and the payload", wire_section(), re.S)
    assert listed is not None
    wire_names = [dtypes.dtype_name(dtype) for dtype in dtypes.WIRE_DTYPES]
    assert re.findall(r"`(\w+)`", listed.group(1)) == wire_names


def test_an_error_reply_has_the_keys_the_readme_names():
    reply = Message(PUSH, request_id=7).error_reply("bad_request", "why")
    assert '`{"error": KIND, "message": TEXT}`' in wire_section()
    assert set(reply.meta) == {"error", "message"}
    assert reply.request_id == 7 and reply.flags == FLAG_REPLY | FLAG_ERROR


def test_every_op_is_listed_with_its_code():
    defined = {
        value.name: int(value)
        for module in OP_MODULES
        for value in vars(importlib.import_module(module)).values()
        if isinstance(value, Op)
    }
    listed = {
        name: int(code)
        for name, code in re.findall(r"`([A-Z_]+)`s? \[(\d+)\]", wire_section().replace("\n", " "))
    }
    assert listed == defined
