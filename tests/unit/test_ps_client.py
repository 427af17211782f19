"""ParameterServerClient's request lanes and slice views, over a scripted in-process transport."""

import threading
import time

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.client.rows import RowClient
from distbelief.client.vectors import ShardVectors
from distbelief.errors import (
    ClosedError,
    RemoteError,
    ShardTimeoutError,
    ShardUnavailableError,
)
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire import Message, Op, ops

SPECS = tensor_specs([("w", torch.zeros(6)), ("b", torch.zeros(2))])


class ScriptedTransport:
    """Answers pushes and pulls at once, recording the order and thread of every request."""

    memory_channel = None  # a shard in this process, not on a shared-memory channel

    def __init__(self) -> None:
        self.calls: list[tuple[Op, int, str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def request(self, message, *, timeout_s, sink=None):
        assert self.gate.wait(5), "test gate never opened"
        self.calls.append(
            (message.op, message.meta.get("clock", 0), threading.current_thread().name)
        )
        if message.op == ops.PUSH:
            return message.reply({"version": len(self.calls), "staleness": 0})
        tensors = []
        for name, dtype, shape in [("float32[0:8]", torch.float32, (8,))]:
            target = sink(name, dtype, shape)
            target.fill_(float(len(self.calls)))
            tensors.append((name, target))
        return message.reply({"version": len(self.calls), "held": False}, tensors)

    def close(self) -> None:
        pass


def _client() -> tuple[ParameterServerClient, ScriptedTransport]:
    client = ParameterServerClient(
        ["tcp://127.0.0.1:9"], SPECS, timeout_s=5, retry_timeout_s=0, worker_id="w"
    )
    transport = ScriptedTransport()
    client._transports = [transport]
    return client, transport


def test_push_now_runs_on_the_calling_thread_when_idle():
    client, transport = _client()
    try:
        flats = FlatLayout(SPECS).allocate()
        assert client.push_now(flats, clock=1) == [1]
        assert client.pull_now(flats, clock=2) == [2]
        assert [name for _, _, name in transport.calls] == [threading.current_thread().name] * 2
        assert bool((flats[torch.float32] == 2.0).all())
    finally:
        client.close()


def test_push_now_behind_queued_requests_keeps_their_order():
    client, transport = _client()
    try:
        flats = FlatLayout(SPECS).allocate()
        transport.gate.clear()  # the queued push waits in the I/O thread
        queued = client.push(flats, clock=1)
        opener = threading.Timer(0.2, transport.gate.set)
        opener.start()
        assert client.push_now(flats, clock=2) == [2]
        assert client.wait(queued) == [1]
        assert [clock for _, clock, _ in transport.calls] == [1, 2]
        opener.join()
    finally:
        client.close()


def test_slice_views_follow_replaced_buffers():
    client, _ = _client()
    try:
        flats = FlatLayout(SPECS).allocate()
        client.pull_now(flats)
        old = flats[torch.float32]
        flats[torch.float32] = torch.zeros(8)  # a new buffer under the same dict
        client.pull_now(flats)
        assert bool((flats[torch.float32] == 2.0).all())
        assert bool((old == 1.0).all())
    finally:
        client.close()


def test_close_without_waiting_cancels_queued_requests():
    client, transport = _client()
    flats = FlatLayout(SPECS).allocate()
    transport.gate.clear()
    running = client.push(flats, clock=1)
    queued = client.push(flats, clock=2)
    deadline = time.monotonic() + 60
    while not running[0].running():
        assert time.monotonic() < deadline, "the lane never took up the first push"
        time.sleep(0.01)
    # close(wait=False) waits (briefly) for the push in flight, once the queued one is dropped.
    closing = threading.Thread(target=client.close, kwargs={"wait": False})
    closing.start()
    while not queued[0].cancelled():
        assert time.monotonic() < deadline, "close(wait=False) never cancelled the queued push"
        time.sleep(0.01)
    transport.gate.set()
    closing.join(60)
    assert not closing.is_alive()
    assert client.wait(running) == [1]
    with pytest.raises(ClosedError, match="after close"):
        client.push(flats, clock=3)


def test_every_request_after_close_names_the_closed_client():
    client, transport = _client()
    flats = FlatLayout(SPECS).allocate()
    client.close()
    vectors = ShardVectors(client)  # Sandblaster's worker side, over the same lanes
    rows = RowClient(["tcp://127.0.0.1:9"], {"t": 4}, timeout_s=5, retry_timeout_s=0)
    rows.close()
    for call, owner in [
        (lambda: client.push(flats, clock=1), "ParameterServerClient"),
        (lambda: client.push_now(flats, clock=1), "ParameterServerClient"),
        (lambda: client.pull(flats), "ParameterServerClient"),
        (lambda: client.pull_now(flats), "ParameterServerClient"),
        (client.stats, "ParameterServerClient"),
        (lambda: vectors.read("x", flats), "ParameterServerClient"),
        (lambda: rows.pull({"t": torch.tensor([1])}), "RowClient"),
    ]:
        with pytest.raises(ClosedError, match=rf"^{owner}: a request after close\(\)$"):
            call()
    assert transport.calls == []
    client.close()  # closing twice does nothing


@pytest.fixture
def unconnected_rows():
    """A row client of two shards that never connects: what it refuses, it refuses before
    sending anything."""
    rows = RowClient(
        ["tcp://127.0.0.1:9", "tcp://127.0.0.1:10"], {"t": 4}, timeout_s=5, retry_timeout_s=0
    )
    yield rows
    rows.close()


@pytest.mark.parametrize(
    ("updates", "error", "message"),
    [
        ({"t": (torch.tensor([1, 2]), torch.ones(3, 4))}, ValueError, r"rows must be \[2, 4\]"),
        ({"t": (torch.tensor([1, 2]), torch.ones(2, 5))}, ValueError, r"rows must be \[2, 4\]"),
        ({"t": (torch.tensor([1, 2]), torch.ones(2, 4, dtype=torch.int64))}, TypeError, "float"),
        (
            {"t": (torch.tensor([1.0, 2.0]), torch.ones(2, 4))},
            TypeError,
            r"^table 't': ids must be an int64 tensor, got torch\.float32$",
        ),
        (
            {"t": (torch.tensor([[1, 2]]), torch.ones(2, 4))},
            ValueError,
            r"^table 't': rows must be \[1, 2, 4\] \(one row of 4 values per id of ids \[1, 2\]\), "
            r"got \[2, 4\]$",
        ),
        ({"t": torch.tensor([1])}, TypeError, r"an update must be \(ids, rows\)"),
        ({"u": (torch.tensor([1]), torch.ones(1, 4))}, ValueError, "'u' was not declared"),
    ],
    ids=["rows-too-many", "width", "int-rows", "float-ids", "2d-ids", "no-pair", "undeclared"],
)
def test_a_push_that_does_not_fit_its_table_is_refused_by_name(
    unconnected_rows, updates, error, message
):
    for push in (unconnected_rows.push, unconnected_rows.push_now):
        with pytest.raises(error, match=message):
            push(updates)


@pytest.mark.parametrize(
    ("ids_by_table", "error", "message"),
    [
        ({"t": [1, 2]}, TypeError, r"^table 't': ids must be an int64 tensor, got list$"),
        ({"t": torch.tensor([1, 2], dtype=torch.int32)}, TypeError, r"got torch\.int32$"),
        ({"t": torch.tensor([1.0])}, TypeError, r"got torch\.float32$"),
        ({"u": torch.tensor([1])}, ValueError, "'u' was not declared"),
        ([torch.tensor([1])], TypeError, "^ids_by_table must map table names to ids"),
    ],
    ids=["list", "int32", "float", "undeclared", "not-a-mapping"],
)
def test_a_pull_of_ids_that_are_no_int64_tensor_is_refused_by_name(
    unconnected_rows, ids_by_table, error, message
):
    for pull in (unconnected_rows.pull, unconnected_rows.start_pull):
        with pytest.raises(error, match=message):
            pull(ids_by_table)


@pytest.mark.parametrize("bad_id", [-1, 10, 2**40])
def test_an_id_outside_a_table_of_a_declared_size_is_refused_as_nn_embedding_refuses_it(bad_id):
    # The shards made a row for it and trained it: an off-by-one in the data went unnoticed.
    rows = RowClient(
        ["tcp://127.0.0.1:9", "tcp://127.0.0.1:10"],
        {"t": 4, "u": 4},
        sizes={"t": 10},
        timeout_s=5,
        retry_timeout_s=0,
    )
    ids = torch.tensor([3, bad_id, 9])
    wanted = (
        rf"^table 't': id {bad_id} is out of range for its 10 rows \(ids must be in \[0, 10\)\)$"
    )
    try:
        for call in (rows.pull, rows.start_pull):
            with pytest.raises(ValueError, match=wanted):
                call({"t": ids.view(1, 3)})
        for call in (rows.push, rows.push_now):
            with pytest.raises(ValueError, match=wanted):
                call({"t": (ids, torch.ones(3, 4))})
        assert rows.take_wire_figures()["bytes_pushed"] == 0
    finally:
        rows.close()


def test_request_each_needs_one_distinct_message_per_shard():
    client = ParameterServerClient(
        ["tcp://127.0.0.1:9", "tcp://127.0.0.1:10"], SPECS, timeout_s=5, retry_timeout_s=0
    )
    try:
        message = Message(ops.STATS)
        with pytest.raises(ValueError, match="2 shards need one distinct message"):
            client.request_each([message, message])  # a transport numbers what it sends
        with pytest.raises(ValueError, match="2 shards need one distinct message"):
            client.request_each([message])
    finally:
        client.close()


def test_unreachable_says_whether_the_last_wait_gave_up_on_a_shard():
    client, transport = _client()  # retry_timeout_s=0: a failed request gives up at once
    answer = transport.request
    failure: list[Exception] = []

    def request(message, *, timeout_s, sink=None):
        if failure:
            raise failure[0]
        return answer(message, timeout_s=timeout_s, sink=sink)

    transport.request = request
    flats = FlatLayout(SPECS).allocate()
    try:
        assert not client.unreachable
        failure.append(ShardUnavailableError("shard 0: connection refused"))
        with pytest.raises(ShardUnavailableError, match="gave up after retrying"):
            client.push_now(flats, clock=1)
        assert client.unreachable
        failure[0] = RemoteError("shard 0: refused")  # it answered: reachable again
        with pytest.raises(RemoteError):
            client.push_now(flats, clock=2)
        assert not client.unreachable
        failure[0] = ShardUnavailableError("shard 0: connection refused")
        with pytest.raises(ShardUnavailableError):
            client.wait(client.pull(flats, clock=3))
        assert client.unreachable
        failure.clear()
        assert client.push_now(flats, clock=4)
        assert not client.unreachable
    finally:
        client.close(wait=False)


def test_a_wait_that_times_out_names_the_shards_whose_requests_are_pending():
    client, transport = _client()
    transport.gate.clear()  # the shard answers nothing until the gate opens
    flats = FlatLayout(SPECS).allocate()
    try:
        futures = client.pull(flats, clock=1)
        with pytest.raises(ShardTimeoutError) as timed_out:
            client.wait(futures, timeout_s=0.2)
        assert str(timed_out.value) == (
            "1 shard request(s) pending after 0.2s: shard 0 (tcp://127.0.0.1:9)"
        )
    finally:
        transport.gate.set()
        client.close(wait=False)


@pytest.mark.parametrize(
    ("argument", "value", "error", "match"),
    [
        ("specs", None, TypeError, r"^specs must be a list of TensorSpec, got None$"),
        ("specs", "w", TypeError, r"^specs must be a list of TensorSpec, got 'w'$"),
        ("worker_id", 5, TypeError, r"^worker_id must be a str, got 5$"),
        ("partitioner", "flat", TypeError, r"^partitioner must be a Partitioner, got 'flat'$"),
        ("num_workers", 0, ValueError, r"^num_workers must be an integer >= 1, got 0$"),
        ("num_workers", True, ValueError, r"^num_workers must be an integer >= 1, got True$"),
        ("pull_changes", "yes", TypeError, r"^pull_changes must be True or False, got 'yes'$"),
        ("shared_memory", "no", TypeError, r"^shared_memory must be True or False, got 'no'$"),
        ("security", "key", TypeError, r"^security must be a WireSecurity, got 'key'$"),
        ("source_host", 5, TypeError, r"^source_host must be a str, got 5$"),
    ],
)
def test_constructor_arguments_of_the_wrong_type_are_refused_naming_them(
    argument, value, error, match
):
    arguments = {"specs": SPECS, argument: value}
    specs = arguments.pop("specs")
    with pytest.raises(error, match=match):
        ParameterServerClient(["tcp://127.0.0.1:9"], specs, timeout_s=5, **arguments)


def test_specs_given_as_a_generator_are_kept():
    client = ParameterServerClient(["tcp://127.0.0.1:9"], (spec for spec in SPECS), timeout_s=5)
    try:
        assert client.specs == list(SPECS)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("flats", "error", "match"),
    [
        (None, TypeError, "must be a dict of dtype -> 1-D tensor, got NoneType"),
        (torch.zeros(8), TypeError, "must be a dict of dtype -> 1-D tensor, got Tensor"),
        ({torch.float64: torch.zeros(8, dtype=torch.float64)}, ValueError, "no torch.float64 par"),
        ({torch.float32: torch.zeros(3)}, ValueError, r"of 8 elements .*, got torch.float32 \[3\]"),
        ({torch.float32: torch.zeros(10)}, ValueError, r"of 8 elements .*\[10\] \(10 elements\)"),
        ({torch.float32: torch.zeros(2, 4)}, ValueError, r"got torch.float32 \[2, 4\]"),
        ({torch.float32: torch.zeros(8, dtype=torch.int32)}, ValueError, "got torch.int32 \\[8\\]"),
        (
            {torch.float32: torch.zeros(8), torch.float64: torch.zeros(1, dtype=torch.float64)},
            ValueError,
            r"\[torch.float64\]: the model's layout has no torch.float64 parameters",
        ),
    ],
    ids=["none", "tensor", "other-dtype", "short", "long", "2d", "int", "extra-dtype"],
)
def test_flat_buffers_that_do_not_fit_the_layout_are_refused_before_any_request(
    flats, error, match
):
    client, transport = _client()
    try:
        for call, argument in [
            (client.push_now, "flat_grads"),
            (client.pull_now, "flat_out"),
            (client.push, "flat_grads"),
            (client.pull, "flat_out"),
            *([(client.handshake, "initial")] if flats is not None else []),  # None: a reader
        ]:
            with pytest.raises(error, match=match) as refused:
                call(flats)
            assert str(refused.value).startswith(argument)
            assert "\n" not in str(refused.value)
        vectors = ShardVectors(client)  # Sandblaster's worker side, over the same slices
        for call, argument in [
            (lambda: vectors.read("x", flats), "flat_out"),
            (lambda: vectors.push_bundle(0, "b", flats), "flat_grads"),
        ]:
            with pytest.raises(error, match=match) as refused:
                call()
            assert str(refused.value).startswith(argument)
        assert transport.calls == []
    finally:
        client.close()


@pytest.mark.parametrize(
    ("min_version", "timeout_s", "match"),
    [
        (-1, 1.0, r"^min_version must be an integer >= 0, got -1$"),
        ("3", 1.0, r"^min_version must be an integer >= 0, got '3'$"),
        (3, None, r"^timeout_s must be a finite number > 0, got None$"),
    ],
)
def test_wait_for_version_refuses_bad_arguments_before_any_request(min_version, timeout_s, match):
    client, transport = _client()
    try:
        with pytest.raises(ValueError, match=match):
            client.wait_for_version(min_version, timeout_s)
        assert transport.calls == []
    finally:
        client.close()
