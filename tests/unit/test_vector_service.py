"""The shard's VECTORS, ACCUMULATE and READ handlers, called as the request layer calls them:
every field checked with a clear error, checkpoints only where a folder was given."""

from __future__ import annotations

import math
import re

import pytest
import torch

from distbelief.errors import EvaluationNotOpenError, ProtocolError, ShardRestartedError
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server.checkpoint import load_checkpoint
from distbelief.sharding import FlatPartitioner, TensorSpec
from distbelief.wire import Message, ops
from distbelief.wire.error_kinds import error_for_kind, kind_of

SPECS = [TensorSpec("w", (4, 3), torch.float64), TensorSpec("h", (5,), torch.float32)]


class Connection:
    """One connection's handlers on a served shard, without sockets."""

    def __init__(self, checkpoint_dir=None) -> None:
        self.shard = ParameterShard(0, 2, server_optimizer_factory("sgd", lr=0.1))
        pieces = FlatPartitioner().partition(SPECS, 2)[0]
        self.shard.initialize(SPECS, [torch.arange(p.numel, dtype=p.dtype) + 1 for p in pieces])
        self.service = ShardService(self.shard, checkpoint_dir=checkpoint_dir)
        self.state = self.service.open_connection("test")

    def ask(self, op, meta, tensors=()) -> Message:
        route = self.service.handlers.routes[op]
        request = Message(op, meta, list(tensors))
        if route.sink_for is not None:
            sink = route.sink_for(self.state, request)
            request.tensors = []
            for name, tensor in tensors:
                buffer = sink(name, tensor.dtype, tuple(tensor.shape))
                request.tensors.append((name, buffer.copy_(tensor)))
        return route.handler(self.state, request)

    def bundle(self, value: float) -> list[tuple[str, torch.Tensor]]:
        return [(p.name, torch.full((p.numel,), value, dtype=p.dtype)) for p in self.shard.slices]


def test_a_program_runs_and_non_finite_results_travel_as_text():
    connection = Connection()
    connection.ask(ops.VECTORS, {"program": [["copy", "d", "param"]]})
    program = [["dot", "d", "param"], ["scale", "d", math.inf], ["max_abs", "d"]]
    reply = connection.ask(ops.VECTORS, {"program": program, "session": "c", "seq": 1})
    dot, top = reply.meta["results"]
    assert dot == sum(float((t * t).sum()) for t in connection.shard.store.params)
    assert top == "inf" and float(top) == math.inf


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({}, "program must be a list of instructions, got None"),
        ({"program": "dot"}, "program must be a list"),
        ({"program": [], "programme": []}, r"unknown field\(s\) \['programme'\]"),
        ({"program": [], "seq": 1}, "session must be a string"),
        ({"program": [], "session": "c", "seq": -1}, "seq must be an integer >= 0"),
        ({"program": [], "checkpoint": "../up"}, "a checkpoint tag is a plain folder name"),
        ({"program": [], "checkpoint": "a/b"}, "plain folder name"),
        ({"program": [], "checkpoint": ".hidden"}, "plain folder name"),
        ({"program": [], "checkpoint": 7}, "plain folder name"),
    ],
)
def test_vectors_fields_are_checked_by_name(meta, match):
    with pytest.raises(ValueError, match=match):
        Connection().ask(ops.VECTORS, meta)


@pytest.mark.parametrize("name", [["zero"], {"zero": 1}])
def test_a_program_whose_instruction_is_named_by_a_list_or_object_is_refused(name):
    connection = Connection()
    with pytest.raises(ValueError, match="unknown instruction") as refused:
        connection.ask(ops.VECTORS, {"program": [[name, "param"]]})
    assert kind_of(refused.value) == "bad_request"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "match"),
    [(_nested(300), "at most 32 deep"), ("x" * 70_000, "at most 65536 bytes")],
    ids=["nested", "long"],
)
def test_a_value_a_reply_could_not_carry_back_is_refused_and_not_kept(value, match):
    connection = Connection()
    with pytest.raises(ValueError, match=match) as refused:
        connection.ask(ops.VECTORS, {"program": [["set_value", "k", value]]})
    assert kind_of(refused.value) == "bad_request"
    reply = connection.ask(ops.VECTORS, {"program": [["get_value", "k"]]})
    assert reply.meta["results"] == [None]


def test_a_program_reading_back_more_values_than_a_reply_carries_is_refused():
    connection = Connection()
    connection.ask(ops.VECTORS, {"program": [["set_value", "k", "x" * 60_000]]})
    with pytest.raises(ValueError, match="reads back at most"):
        connection.ask(ops.VECTORS, {"program": [["get_value", "k"]] * 100})
    reply = connection.ask(ops.VECTORS, {"program": [["get_value", "k"]] * 2})
    assert reply.meta["results"] == ["x" * 60_000] * 2


def test_checkpoint_without_a_folder_is_refused_before_the_program_runs():
    connection = Connection()
    with pytest.raises(
        ValueError, match=r"shard 0 has no checkpoint folder \(start it with --checkpoint-dir\)"
    ):
        connection.ask(ops.VECTORS, {"program": [["zero", "d"]], "checkpoint": "lbfgs-000001"})
    assert connection.shard.store.find("d") is None


def test_checkpoint_is_saved_under_its_tag_before_the_reply(tmp_path):
    connection = Connection(checkpoint_dir=tmp_path)
    meta = {"program": [["copy", "d", "param"], ["set_value", "k", 3]], "checkpoint": "lbfgs-1"}
    connection.ask(ops.VECTORS, meta)
    state = load_checkpoint(tmp_path / "lbfgs-1", 0)
    assert state is not None and state.values["store"]["values"] == {"k": 3}
    assert set(state.values["store"]["buffers"]) == {"param", "d"}


def test_a_bundle_is_staged_committed_once_and_refused_when_not_open():
    connection = Connection()
    connection.ask(ops.VECTORS, {"program": [["open_evaluation", 3, "grad"]]})
    assert (
        connection.ask(
            ops.ACCUMULATE, {"evaluation": 3, "bundle": "w0-s-1"}, connection.bundle(2.0)
        ).meta
        == {}
    )
    connection.ask(ops.VECTORS, {"program": [["commit", 3, "w0-s-1"], ["commit", 3, "w0-s-1"]]})
    grad = connection.shard.store.get("grad")
    assert all(bool((t == 2.0).all()) for t in grad)
    connection.ask(ops.VECTORS, {"program": [["close_evaluation", 3]]})
    with pytest.raises(EvaluationNotOpenError, match="not open") as refused:
        connection.ask(
            ops.ACCUMULATE, {"evaluation": 3, "bundle": "w0-s-2"}, connection.bundle(1.0)
        )
    assert error_for_kind(kind_of(refused.value)) is EvaluationNotOpenError


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"evaluation": "3", "bundle": "b"}, "evaluation must be an integer >= 0, got '3'"),
        ({"evaluation": True, "bundle": "b"}, "evaluation must be an integer"),
        ({"evaluation": 3}, "a bundle id is a string"),
        ({"evaluation": 3, "bundle": "b" * 129}, "a bundle id is a string of 1-128"),
        ({"evaluation": 3, "bundle": "b", "worker": "w"}, r"unknown field\(s\) \['worker'\]"),
    ],
)
def test_accumulate_fields_are_checked_by_name(meta, match):
    connection = Connection()
    with pytest.raises(ValueError, match=match):
        connection.ask(ops.ACCUMULATE, meta, connection.bundle(1.0))


def test_accumulate_tensors_are_named_and_shaped_like_a_push():
    connection = Connection()
    connection.ask(ops.VECTORS, {"program": [["open_evaluation", 3, "grad"]]})
    meta = {"evaluation": 3, "bundle": "b"}
    tensors = connection.bundle(1.0)
    with pytest.raises(ProtocolError, match=r"shard 0 does not own 'float64\[99:100\]'"):
        connection.ask(
            ops.ACCUMULATE, meta, [("float64[99:100]", torch.ones(1, dtype=torch.float64))]
        )
    name = tensors[0][0]
    with pytest.raises(
        ProtocolError, match=re.escape(f"tensor '{name}': expected torch.float64 [6]")
    ):
        connection.ask(ops.ACCUMULATE, meta, [(name, torch.ones(1, dtype=torch.float64))])
    with pytest.raises(ProtocolError, match="a bundle must carry"):
        connection.ask(ops.ACCUMULATE, meta, tensors[:1])


def test_read_sends_the_named_vector_as_a_pull_sends_param():
    connection = Connection()
    connection.ask(ops.VECTORS, {"program": [["copy", "d", "param"], ["scale", "d", 3.0]]})
    reply = connection.ask(ops.READ, {"vector": "d"})
    assert [name for name, _ in reply.tensors] == [p.name for p in connection.shard.slices]
    for (_, got), param in zip(reply.tensors, connection.shard.store.params, strict=True):
        assert torch.equal(got, param * 3.0)
    with pytest.raises(ValueError, match="shard 0 has no vector 'nothing'"):
        connection.ask(ops.READ, {"vector": "nothing"})
    with pytest.raises(ValueError, match="a vector name"):
        connection.ask(ops.READ, {})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['name'\]"):
        connection.ask(ops.READ, {"vector": "d", "name": "d"})


def test_a_program_that_steps_the_parameters_is_a_new_version():
    connection = Connection()
    connection.ask(ops.VECTORS, {"program": [["copy", "d", "param"], ["dot", "d", "d"]]})
    assert connection.shard.version == 0  # no write to param
    connection.ask(ops.VECTORS, {"program": [["axpy", "param", 0.5, "d"]]})
    assert connection.shard.version == 1
    outs = [torch.empty(p.numel, dtype=p.dtype) for p in connection.shard.slices]
    assert connection.shard.pull_into(outs).version == 1
    assert torch.equal(outs[0], 1.5 * (torch.arange(outs[0].numel(), dtype=torch.float64) + 1))


def test_a_program_for_another_life_of_the_shard_is_refused_before_it_runs():
    connection = Connection()
    reply = connection.ask(ops.VECTORS, {"program": [["copy", "d", "param"]]})
    assert reply.meta["life"] == connection.shard.life
    with pytest.raises(ShardRestartedError, match="was restarted"):
        connection.ask(ops.VECTORS, {"program": [["zero", "d"]], "life": "0123456789abcdef"})
    assert kind_of(ShardRestartedError("x")) == "shard_restarted"
    assert error_for_kind("shard_restarted") is ShardRestartedError
    outs = [torch.empty(p.numel, dtype=p.dtype) for p in connection.shard.slices]
    connection.shard.read_vector_into("d", outs)
    assert torch.equal(outs[0], connection.shard.store.params[0])  # the zero did not run


@pytest.mark.parametrize("max_wait_s", [True, -1, math.nan, 1e9, "1"])
def test_a_pull_whose_wait_is_no_number_of_seconds_in_range_is_refused(max_wait_s):
    # true is no number of seconds (it read as 1 s), as no other field takes it for 1.
    connection = Connection()
    with pytest.raises(ValueError, match="max_wait_s must be in"):
        connection.ask(ops.PULL, {"max_wait_s": max_wait_s})
    assert len(connection.ask(ops.PULL, {"max_wait_s": 0.5}).tensors) == 2
