"""The shard's row ops, called as the request layer calls them: a refused ROWS_HELLO declares
none of its tables."""

from __future__ import annotations

import pytest

from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.wire import Message
from distbelief.wire.error_kinds import kind_of
from distbelief.wire.row_ops import ROWS_HELLO


def _hello(service: ShardService, tables: dict) -> Message:
    connection = service.open_connection("127.0.0.1:1")
    handler = service.handlers.routes[ROWS_HELLO].handler
    return handler(connection, Message(ROWS_HELLO, {"shard_id": 0, "tables": tables}))


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
    with pytest.raises(ValueError, match=match) as refused:
        _hello(service, tables)
    assert kind_of(refused.value) == "bad_request"
    assert service.tables.names() == ["ads"]
    assert set(_hello(service, {"users": 16}).meta["tables"]) == {"ads", "users"}
