"""Shared parameters: the shard's side moves its slices into a memory file, a reader copies them
under the sequence lock; a shard that shares updates exactly as one that does not."""

from __future__ import annotations

import threading

import pytest
import torch

from distbelief.config import ConsistencyConfig
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.sharding import FlatPartitioner, tensor_specs
from distbelief.wire import shared_params
from distbelief.wire.shared_params import SharedParamsReader, SharedTensors

pytestmark = pytest.mark.skipif(
    shared_params.supported() is not None, reason=str(shared_params.supported())
)


def _slices(params):
    return [(p.numel(), p.dtype) for p in params]


def test_a_reader_copies_what_the_shard_holds_with_its_version():
    params = [torch.arange(10, dtype=torch.float32), torch.ones(3, dtype=torch.float64)]
    originals = [p.clone() for p in params]
    shared = SharedTensors(params, version=7)
    reader = SharedParamsReader.open(shared.offer(), _slices(params))
    try:
        outs = [torch.zeros_like(p) for p in params]
        assert reader.read_into(outs) == 7
        assert all(torch.equal(a, b) for a, b in zip(outs, originals, strict=True))
        shared.begin_write()
        params[0].add_(1.0)  # the same tensor objects now live in the shared file
        shared.end_write(8)
        assert reader.read_into(outs) == 8
        assert torch.equal(outs[0], originals[0] + 1)
    finally:
        reader.close()


def test_a_read_during_a_write_is_left_to_a_pull_and_a_retired_file_is_not_read():
    params = [torch.zeros(4)]
    shared = SharedTensors(params, version=0)
    reader = SharedParamsReader.open(shared.offer(), _slices(params))
    try:
        shared.begin_write()  # a writer stopped half-way: every try sees an odd counter
        assert reader.read_into([torch.empty(4)]) is None
        assert reader.usable
        shared.end_write(1)
        assert reader.read_into([torch.empty(4)]) == 1
        shared.retire()
        assert not reader.usable
        assert reader.read_into([torch.empty(4)]) is None
    finally:
        reader.close()


def test_an_offer_that_does_not_fit_or_is_not_the_file_is_refused(tmp_path):
    params = [torch.zeros(4)]
    shared = SharedTensors(params, version=0)
    with open(tmp_path / "not-shared-memory", "wb+") as other:
        other.write(bytes(shared.size))  # of the offered size, but an ordinary file
        other.flush()
        with pytest.raises(ValueError, match="not the one offered"):
            SharedParamsReader.open({**shared.offer(), "fd": other.fileno()}, _slices(params))
    with pytest.raises(ValueError, match="do not fit"):
        SharedParamsReader.open(shared.offer(), [(5, torch.float32)])
    with pytest.raises(ValueError, match="not the one offered"):
        SharedParamsReader.open({**shared.offer(), "token": shared.token + 1}, _slices(params))
    with pytest.raises(ValueError, match="outside the file"):
        SharedParamsReader.open({**shared.offer(), "size": 64}, _slices(params))
    with pytest.raises(ValueError, match="malformed"):
        SharedParamsReader.open({"pid": 1}, _slices(params))
    for bad in ({"pid": 2**63}, {"pid": 0}, {"pid": -5}, {"fd": 2**40}, {"fd": -1}):
        with pytest.raises(ValueError, match="malformed"):  # not an OverflowError
            SharedParamsReader.open({**shared.offer(), **bad}, _slices(params))
    with pytest.raises(OSError):
        SharedParamsReader.open({**shared.offer(), "fd": 987654}, _slices(params))


def _shard(optimizer: str, consistency: ConsistencyConfig | None = None) -> ParameterShard:
    factory = server_optimizer_factory(optimizer, lr=0.1, momentum=0.9)
    shard = ParameterShard(0, 1, factory, consistency)
    specs = tensor_specs([("w", torch.zeros(6, 5)), ("b", torch.zeros(5, dtype=torch.float64))])
    torch.manual_seed(0)
    pieces = FlatPartitioner().partition(specs, 1)[0]
    shard.initialize(specs, [torch.randn(piece.numel, dtype=piece.dtype) for piece in pieces])
    return shard


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_a_shard_that_shares_updates_exactly_as_one_that_does_not(optimizer):
    plain, sharing = _shard(optimizer), _shard(optimizer)
    shared = sharing.share_parameters()
    assert isinstance(shared, SharedTensors)
    assert sharing.share_parameters() is shared  # moved once
    reader = SharedParamsReader.open(shared.offer(), [(s.numel, s.dtype) for s in sharing.slices])
    try:
        for step in range(5):
            torch.manual_seed(step)
            grads = [torch.randn(piece.numel, dtype=piece.dtype) for piece in plain.slices]
            plain.push([g.clone() for g in grads])
            sharing.push([g.clone() for g in grads])
        expected = plain.parameters()
        assert all(torch.equal(a, b) for a, b in zip(sharing.parameters(), expected, strict=True))
        outs = [torch.empty(piece.numel, dtype=piece.dtype) for piece in sharing.slices]
        assert reader.read_into(outs) == sharing.version == 5
        assert all(torch.equal(a, b) for a, b in zip(outs, expected, strict=True))
    finally:
        reader.close()


def test_shards_whose_pulls_wait_or_leave_state_do_not_share():
    bounded = _shard("sgd", ConsistencyConfig(max_staleness=2))
    assert "consistency" in bounded.share_parameters()
    compensating = _shard("sgd", ConsistencyConfig(staleness_policy="dc-asgd"))
    assert "consistency" in compensating.share_parameters()


def test_a_restored_shard_retires_what_it_shared():
    shard = _shard("sgd")
    shared = shard.share_parameters()
    assert isinstance(shared, SharedTensors)
    reader = SharedParamsReader.open(shared.offer(), [(s.numel, s.dtype) for s in shard.slices])
    try:
        shard.restore(shard.snapshot())
        assert not reader.usable
        again = shard.share_parameters()
        assert isinstance(again, SharedTensors) and again is not shared
    finally:
        reader.close()


def _closed_from_two_threads(monkeypatch, close) -> list[BaseException]:
    """Call ``close`` while another thread is inside the same call's ``os.close`` (as a client
    closing while its lane drops the same reader or buffers); the errors either call raised."""
    real_close, errors, entered = shared_params.os.close, [], []

    def run(fn):
        try:
            fn()
        except BaseException as e:  # handed to the test
            errors.append(e)

    def close_while_another_closes(fd):
        if not entered:
            entered.append(fd)
            other = threading.Thread(target=run, args=(close,))
            other.start()
            other.join(1.0)  # it waits for this call to end, or (unguarded) closes fd itself
            try:
                real_close(fd)
            finally:
                monkeypatch.setattr(shared_params.os, "close", real_close)
                entered.append(other)
            return
        real_close(fd)

    monkeypatch.setattr(shared_params.os, "close", close_while_another_closes)
    run(close)
    entered[-1].join(60)
    return errors


def test_a_reader_closed_from_two_threads_closes_its_handle_once(monkeypatch):
    params = [torch.arange(10, dtype=torch.float32)]
    shared = SharedTensors(params, version=1)
    reader = SharedParamsReader.open(shared.offer(), _slices(params))
    try:
        assert _closed_from_two_threads(monkeypatch, reader.close) == []
        assert not reader.usable
    finally:
        shared.retire()


def test_buffers_retired_from_two_threads_close_their_file_once(monkeypatch):
    shared = SharedTensors([torch.zeros(8)], name="push-buffers")
    assert _closed_from_two_threads(monkeypatch, shared.retire) == []
    assert shared.fd == -1
