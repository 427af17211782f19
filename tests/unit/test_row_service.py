"""The shard's row ops, called as the request layer calls them: a refused ROWS_HELLO declares
none of its tables; a table declared with another size or row width than it holds is refused
(typed), also after a
restart from its checkpoint; a PULL_ROWS asking for more rows than one request may is refused before
anything is allocated, and the row client splits such a pull."""

from __future__ import annotations

import pytest
import torch

from distbelief.client.rows import ShardPart, split_for_pull
from distbelief.errors import TableSizeMismatchError, TableWidthMismatchError
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server.row_checkpoint import load_row_tables, save_row_tables
from distbelief.server.row_tables import RowTableSettings, ShardTables
from distbelief.wire import Message
from distbelief.wire.error_kinds import kind_of
from distbelief.wire.row_ops import PULL_ROWS, ROWS_HELLO


def _answer(service: ShardService, request: Message) -> Message:
    connection = service.open_connection("127.0.0.1:1")
    return service.handlers.routes[request.op].handler(connection, request)


def _hello(service: ShardService, tables: dict, sizes: dict | None = None) -> Message:
    meta = {"shard_id": 0, "tables": tables, **({} if sizes is None else {"sizes": sizes})}
    return _answer(service, Message(ROWS_HELLO, meta))


def _service() -> ShardService:
    return ShardService(ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1)))


@pytest.mark.parametrize(
    ("tables", "match"),
    [
        ({"users": 8, "items": 0}, "row width must be an integer"),
        ({"users": 8, "items/../x": 4}, "table name"),
        ({"users": 8, "ads": 16}, "table ads holds rows of 4 values"),
    ],
)
def test_a_refused_rows_hello_declares_none_of_its_tables(tables, match):
    service = ShardService(ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1)))
    _hello(service, {"ads": 4})
    with pytest.raises((ValueError, TableWidthMismatchError), match=match) as refused:
        _hello(service, tables)
    another_width = isinstance(refused.value, TableWidthMismatchError)
    assert kind_of(refused.value) == ("table_width_mismatch" if another_width else "bad_request")
    assert service.tables.names() == ["ads"]
    assert set(_hello(service, {"users": 16}).meta["tables"]) == {"ads", "users"}


def test_a_table_declared_with_another_size_is_refused_by_name():
    service = _service()
    _hello(service, {"ads": 4, "users": 8}, {"ads": 2000, "users": 50})
    # Typed, and with no hint: only the client knows where its size came from.
    with pytest.raises(
        TableSizeMismatchError, match=r"^table ads holds 2000 rows on shard 0, not 500$"
    ) as refused:
        _hello(service, {"users": 8, "ads": 4}, {"users": 50, "ads": 500})
    assert kind_of(refused.value) == "table_size_mismatch"
    _hello(service, {"ads": 4}, {"ads": 2000})
    _hello(service, {"ads": 4})  # a client that declares no size is not checked


def test_a_table_declared_with_another_width_is_refused_by_name():
    service = _service()
    _hello(service, {"ads": 4, "users": 8})
    # Typed, and with no hint: only the client knows where its width came from.
    with pytest.raises(
        TableWidthMismatchError, match=r"^table ads holds rows of 4 values on shard 0, not 16$"
    ) as refused:
        _hello(service, {"users": 8, "ads": 16})
    assert kind_of(refused.value) == "table_width_mismatch"


def test_a_restored_table_remembers_its_size_and_an_older_save_takes_the_first(tmp_path):
    service = _service()
    _hello(service, {"ads": 4, "users": 8}, {"ads": 2000})
    saved = service.tables.snapshot()
    save_row_tables(tmp_path, 0, 1, 1, saved)
    restarted = _service()
    restarted.tables.restore(load_row_tables(tmp_path, 0).tables)
    with pytest.raises(
        TableSizeMismatchError, match="table ads holds 2000 rows on shard 0, not 500"
    ):
        _hello(restarted, {"ads": 4}, {"ads": 500})
    _hello(restarted, {"users": 8}, {"users": 50})  # saved without a size: the first one holds
    with pytest.raises(
        TableSizeMismatchError, match="table users holds 50 rows on shard 0, not 60"
    ):
        _hello(restarted, {"users": 8}, {"users": 60})


def test_a_pull_of_more_rows_than_one_request_may_ask_for_is_refused():
    # 20,000 ids of a 65,536-wide table: a 160 KB request for 5 GB of rows.
    service = ShardService(ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1)))
    _hello(service, {"wide": 65536})
    ids = torch.arange(20_000)
    pull = Message(PULL_ROWS, {"tables": ["wide"], "counts": [20_000]}, [("ids", ids)])
    with pytest.raises(ValueError, match="past the 268435456 one request may ask for") as refused:
        _answer(service, pull)
    assert kind_of(refused.value) == "bad_request"
    assert service.tables.num_pulled_rows == 0
    few = Message(PULL_ROWS, {"tables": ["wide"], "counts": [10]}, [("ids", ids[:10])])
    assert _answer(service, few).tensors[0][1].numel() == 10 * 65536


def test_a_pull_is_split_into_requests_within_the_limit_in_order():
    ids = torch.tensor([10, 11, 12, 13, 14, 20, 21, 30])
    part = ShardPart(["a", "b", "c"], [5, 2, 1], ids, None)
    pieces = split_for_pull(part, [2, 4, 2], max_bytes=3 * 8)  # 3 rows of a, 1.5 of b
    assert [(p.names, p.counts, p.ids.tolist()) for p in pieces] == [
        (["a"], [3], [10, 11, 12]),
        (["a"], [2], [13, 14]),
        (["b"], [1], [20]),
        (["b", "c"], [1, 1], [21, 30]),
    ]
    positions = [[t.tolist() for t in p.positions] for p in pieces]
    assert positions == [[[0, 1, 2]], [[3, 4]], [[0]], [[1], [0]]]
    assert split_for_pull(part, [2, 4, 2], max_bytes=8 * 8 + 2 * 16) == [part]


def test_a_push_repeating_an_id_in_one_table_is_refused_by_name_and_changes_nothing():
    tables = ShardTables(0, 1, RowTableSettings(lr=1.0, init_std=0.0))
    tables.declare_all({"ads": 2, "users": 2, "items": 2})
    names, counts = ["ads", "users", "items"], [2, 3, 1]
    # The same id in two tables is no repeat; 7 twice in "users" is.
    ids = torch.tensor([5, 7, 7, 5, 7, 9])
    with pytest.raises(ValueError, match=r"^table users: pushed ids must be unique"):
        tables.push(names, counts, ids, torch.ones(12))
    assert tables.total_steps == 0
    assert tables.pull(names, counts, ids).abs().sum() == 0
    ids = torch.tensor([5, 7, 7, 5, 9, 7])  # every table's ids distinct, in any order
    assert tables.push(names, counts, ids, torch.ones(12))
    assert tables.total_steps == 3
    assert torch.equal(tables.pull(names, counts, ids), torch.full((12,), -1.0))
