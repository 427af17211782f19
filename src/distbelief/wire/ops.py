"""Ops: what a request asks of its server, as values any module can define.

An op is a named u8 code. ``define_op`` makes one and refuses a name or code already taken, so a
capability adds its ops in its own file; a service registers a handler per op in an
``OpRegistry``. This module names the parameter-server ops and knows nothing of what any op does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from distbelief.wire.framing import Sink
    from distbelief.wire.message import Message

MAX_OP_CODE = 255
"""Op codes travel as the header's u8; 0 is never an op, so a zeroed header is no request."""


class Op(int):
    """An op code that carries its name: it packs as the header's u8, and errors and logs show
    the name. ``define_op`` is how ops are made; an ``Op`` built directly is not defined, and a
    peer refuses it.
    """

    name: str

    def __new__(cls, name: str, code: int) -> Op:
        op = super().__new__(cls, code)
        op.name = name
        return op

    def __repr__(self) -> str:
        return f"Op({self.name!r}, {int(self)})"

    def __str__(self) -> str:
        return self.name

    def __reduce__(self) -> tuple[Callable[[str, int], Op], tuple[str, int]]:
        return _unpickle_op, (self.name, int(self))


_define_lock = threading.Lock()
_ops_by_code: dict[int, Op] = {}
_ops_by_name: dict[str, Op] = {}


def define_op(name: str, code: int) -> Op:
    """Make the op ``name`` with wire code ``code`` (both must be new in this process).

    Raises:
        ValueError: ``name`` is not an identifier, ``code`` is not in 1..255, or either is
            already taken by another op.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"op name {name!r} is not an identifier")
    if type(code) is not int or not 1 <= code <= MAX_OP_CODE:
        raise ValueError(f"op {name}: code {code!r} is not in 1..{MAX_OP_CODE}")
    with _define_lock:
        if name in _ops_by_name:
            taken = _ops_by_name[name]
            raise ValueError(f"op {name} is already defined (with code {int(taken)})")
        if code in _ops_by_code:
            raise ValueError(f"op {name}: code {code} is already taken by {_ops_by_code[code]}")
        op = Op(name, code)
        _ops_by_code[code] = op
        _ops_by_name[name] = op
    return op


def _unpickle_op(name: str, code: int) -> Op:
    """The op this process defines with ``name`` and ``code``, else an undefined value."""
    op = _ops_by_code.get(code)
    return op if op is not None and op.name == name else Op(name, code)


op_for_code: Callable[[int], Op | None] = _ops_by_code.get
"""The op defined with a code in this process (None: no op has it). The dict's own ``get``, as
the reader calls it once per frame."""


def defined_ops() -> list[Op]:
    """Every op defined in this process, by code."""
    return sorted(_ops_by_code.values())


HELLO = define_op("HELLO", 1)
"""Layout check: the client's shard id and parameter specs against the shard's."""
PUSHED_STEP_KEY = "pushed_step"
"""In a HELLO's reply: the step (clock) of the last push the shard took from the worker id
the HELLO names, in this life of the shard; absent when it took none."""
INIT = define_op("INIT", 2)
"""The first worker's initial parameters for an empty shard."""
PUSH = define_op("PUSH", 3)
"""A gradient for every slice the shard owns."""
PULL = define_op("PULL", 4)
"""The shard's current slices, sent into the client's buffers."""
STATS = define_op("STATS", 5)
"""The shard's counters."""
VECTORS = define_op("VECTORS", 6)
"""A vector program (``vector_program.py``) run on the shard's named vectors; the reply
carries the shard's partial results."""
ACCUMULATE = define_op("ACCUMULATE", 7)
"""A worker's gradient bundle for an open Sandblaster evaluation, staged until committed."""
READ = define_op("READ", 8)
"""The shard's slices of one named vector (the point a Sandblaster evaluation is at)."""
SHARE = define_op("SHARE", 10)
"""Where a client on the shard's host may read the parameters without a request
(``shared_params.py``), or why it may not."""


Handler = Callable[[Any, "Message"], "Message"]
"""Answers one request, given the state the service made for the request's connection; raises
ValueError or a PSError to refuse it (see error_kinds.py)."""

SinkPicker = Callable[[Any, "Message"], "Sink | None"]
"""Picks where a request's tensors are received (None: fresh tensors), given the connection's
state and the request with its op and metadata read, its tensors not yet."""


class Route(NamedTuple):
    """What a server does with one op."""

    handler: Handler
    sink_for: SinkPicker | None


class OpRegistry:
    """A service's ops and their handlers. Register before serving; each op at most once."""

    def __init__(self) -> None:
        self.routes: dict[Op, Route] = {}
        """Op -> route, read by the server once per request (ops hash as their codes)."""

    def register(self, op: Op, handler: Handler, *, sink_for: SinkPicker | None = None) -> None:
        """Answer ``op`` with ``handler``; ``sink_for`` picks buffers for its tensors.

        Raises:
            ValueError: ``op`` is not a defined op, or already has a handler here.
        """
        if not isinstance(op, Op) or op_for_code(op) is not op:
            raise ValueError(f"{op!r} is not a defined op (make ops with define_op)")
        if op in self.routes:
            existing = getattr(self.routes[op].handler, "__qualname__", self.routes[op].handler)
            raise ValueError(f"op {op} already has a handler here ({existing})")
        self.routes[op] = Route(handler, sink_for)

    def ops(self) -> list[Op]:
        """The ops with a handler, by code."""
        return sorted(self.routes)

    def __contains__(self, op: object) -> bool:
        return op in self.routes
