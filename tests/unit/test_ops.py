"""Ops as values, a service's op registry, and the error-kind table (no sockets)."""

import pickle

import pytest

from distbelief.errors import ModelMismatchError, ProtocolError, RemoteError
from distbelief.wire import Message, Op, OpRegistry, define_op, ops
from distbelief.wire.error_kinds import ERROR_KINDS, INTERNAL, error_for_kind, kind_of
from distbelief.wire.message import HEADER, MAGIC, PROTOCOL_VERSION

PING = define_op("TEST_OPS_PING", 240)


def _answer(state, request: Message) -> Message:
    return request.reply()


def test_base_ops_keep_their_wire_codes():
    assert [(op.name, int(op)) for op in (ops.HELLO, ops.INIT, ops.PUSH, ops.PULL, ops.STATS)] == [
        ("HELLO", 1),
        ("INIT", 2),
        ("PUSH", 3),
        ("PULL", 4),
        ("STATS", 5),
    ]


def test_an_op_is_its_code_with_a_name():
    assert PING == 240 and isinstance(PING, int)
    assert (str(PING), repr(PING)) == ("TEST_OPS_PING", "Op('TEST_OPS_PING', 240)")
    assert ops.op_for_code(240) is PING and PING in ops.defined_ops()
    assert HEADER.unpack(HEADER.pack(MAGIC, PROTOCOL_VERSION, PING, 0, 1, 0, 0))[2] == 240
    assert pickle.loads(pickle.dumps(PING)) is PING  # the receiving process's defined op
    stranger = pickle.loads(pickle.dumps(Op("ELSEWHERE", 244)))
    assert (stranger.name, int(stranger), ops.op_for_code(244)) == ("ELSEWHERE", 244, None)


def test_define_op_refuses_a_taken_name_or_code():
    with pytest.raises(ValueError, match=r"op TEST_OPS_PING is already defined \(with code 240\)"):
        define_op("TEST_OPS_PING", 241)
    with pytest.raises(ValueError, match="op OTHER: code 3 is already taken by PUSH"):
        define_op("OTHER", 3)
    assert ops.op_for_code(241) is None


@pytest.mark.parametrize(
    ("name", "code", "match"),
    [
        ("NO GOOD", 242, "op name 'NO GOOD' is not an identifier"),
        ("", 242, "op name '' is not an identifier"),
        ("ZERO", 0, r"op ZERO: code 0 is not in 1\.\.255"),
        ("WIDE", 256, r"op WIDE: code 256 is not in 1\.\.255"),
        ("TEXT", "7", r"op TEXT: code '7' is not in 1\.\.255"),
        ("FLAG", True, r"op FLAG: code True is not in 1\.\.255"),
    ],
)
def test_define_op_refuses_bad_names_and_codes(name, code, match):
    with pytest.raises(ValueError, match=match):
        define_op(name, code)


def test_registry_routes_each_op_once():
    registry = OpRegistry()
    registry.register(PING, _answer)
    registry.register(ops.HELLO, _answer, sink_for=lambda state, request: None)
    assert registry.ops() == [ops.HELLO, PING]
    assert PING in registry and ops.PUSH not in registry
    assert registry.routes[240].handler is _answer  # looked up by the header's bare code
    with pytest.raises(ValueError, match=r"op TEST_OPS_PING already has a handler here \(_answer"):
        registry.register(PING, lambda state, request: request.reply())


@pytest.mark.parametrize("op", [Op("NEVER_DEFINED", 243), 3, "PUSH"], ids=repr)
def test_registry_refuses_ops_not_made_by_define_op(op):
    with pytest.raises(ValueError, match="is not a defined op"):
        OpRegistry().register(op, _answer)


def test_error_kinds_round_trip_through_the_table():
    assert kind_of(ModelMismatchError("x")) == "model_mismatch"
    assert error_for_kind("model_mismatch") is ModelMismatchError
    assert kind_of(ValueError("x")) == kind_of(ProtocolError("x")) == "bad_request"
    assert error_for_kind("bad_request") is RemoteError
    assert kind_of(RuntimeError("x")) == INTERNAL
    for unknown in (INTERNAL, "from_a_newer_peer", None, 3):
        assert error_for_kind(unknown) is RemoteError


def test_no_error_kind_is_shadowed_by_an_earlier_one():
    for entry in ERROR_KINDS:
        for sent in entry.sent_for:
            assert kind_of(sent("x")) == entry.kind, f"{sent.__name__} is sent as another kind"
        assert issubclass(entry.raised_as, RemoteError)
