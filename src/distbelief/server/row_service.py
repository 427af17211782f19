"""The row ops' handlers: a shard's answers to ROWS_HELLO, PULL_ROWS and PUSH_ROWS, on the
process's ``ShardTables``. Registered on the shard service beside the dense ops; each handler
gets the request's connection and reads the tables from its service."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from distbelief.errors import ProtocolError
from distbelief.server.shard import check_listed_place
from distbelief.wire.message import Message
from distbelief.wire.ops import PUSHED_STEP_KEY
from distbelief.wire.row_ops import PULL_ROWS, PUSH_ROWS, ROWS_HELLO

if TYPE_CHECKING:
    from distbelief.server.row_tables import ShardTables
    from distbelief.wire.ops import OpRegistry


def register_row_ops(handlers: OpRegistry) -> None:
    """Answer the row ops with the handlers below (the connection's ``service.tables``)."""
    handlers.register(ROWS_HELLO, rows_hello)
    handlers.register(PULL_ROWS, pull_rows)
    handlers.register(PUSH_ROWS, push_rows)


def _tables_of(connection) -> ShardTables:
    return connection.service.tables


def _listed_tables(request: Message, tensor_names: list[str]) -> tuple[list[str], list[int]]:
    """The request's tables and their id counts, checked against the tensors it carries."""
    names, counts = request.meta.get("tables"), request.meta.get("counts")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("a row request must list its tables (meta 'tables': [names])")
    if len(set(names)) != len(names):
        raise ValueError(f"a row request names a table twice: {names}")
    if (
        not isinstance(counts, list)
        or len(counts) != len(names)
        or not all(type(c) is int and c >= 0 for c in counts)
    ):
        raise ValueError("a row request must give one id count >= 0 per table (meta 'counts')")
    sent = [name for name, _ in request.tensors]
    if sent != tensor_names:
        raise ProtocolError(f"{request.op} must carry tensors {tensor_names}, got {sent}")
    return names, counts


def describe_tables(tables: ShardTables) -> dict:
    """The shard's row settings and each table's counters (JSON-able)."""
    return {
        "shard_id": tables.shard_id,
        "num_shards": tables.num_shards,
        "settings": tables.settings.to_json(),
        "tables": {name: asdict(c) for name, c in tables.counters().items()},
        "pulled_rows": tables.num_pulled_rows,
        "pushed_rows": tables.num_pushed_rows,
    }


def rows_hello(connection, request: Message) -> Message:
    tables = _tables_of(connection)
    check_listed_place(tables.shard_id, tables.num_shards, request.meta.get("shard_id"))
    declared = request.meta.get("tables", {})
    if not isinstance(declared, dict):
        raise ValueError("ROWS_HELLO's 'tables' must map table names to row widths")
    sizes = request.meta.get("sizes", {})  # absent from older clients: no size is checked
    if not isinstance(sizes, dict):
        raise ValueError("ROWS_HELLO's 'sizes' must map table names to their numbers of rows")
    tables.declare_all(declared, sizes)  # all or none: a refused hello declares nothing
    described = describe_tables(tables)
    worker = request.meta.get("worker")
    if isinstance(worker, str) and worker in tables.pushed_steps:
        # A restarted worker learns the step of the last row push its dead life got applied.
        described[PUSHED_STEP_KEY] = tables.pushed_steps[worker]
    return request.reply(described)


def pull_rows(connection, request: Message) -> Message:
    tables = _tables_of(connection)
    names, counts = _listed_tables(request, ["ids"])
    ids = request.tensors[0][1]
    rows = tables.pull(names, counts, ids)
    connection.service.count_bytes(ids.nbytes, rows.nbytes)  # as the client counts them
    return request.reply({}, [("rows", rows)])


def push_rows(connection, request: Message) -> Message:
    tables = _tables_of(connection)
    names, counts = _listed_tables(request, ["ids", "grads"])
    seq = None
    if "seq" in request.meta:
        session, number = request.meta.get("session"), request.meta["seq"]
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            raise ValueError(f"a push with seq needs a session string, got {session!r}")
        if type(number) is not int or number < 1:
            raise ValueError(f"seq must be an integer >= 1, got {number!r}")
        seq = (session, number)
    worker, step = request.meta.get("worker"), request.meta.get("clock")
    if worker is not None and not isinstance(worker, str):
        raise ValueError(f"worker id must be a string, got {worker!r}")
    if step is not None and (type(step) is not int or step < 0):
        raise ValueError(f"clock must be an integer >= 0, got {step!r}")
    ids, grads = request.tensors[0][1], request.tensors[1][1]
    applied = tables.push(names, counts, ids, grads, seq=seq, worker=worker, step=step)
    connection.service.count_bytes(ids.nbytes + grads.nbytes, 0)
    return request.reply({"applied": applied})
