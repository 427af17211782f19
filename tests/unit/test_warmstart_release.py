"""Which faults end a job's warm start early (``launch/warmstart.py``), with the shards'
replies stood in for: the requests themselves are tested against a real shard in
tests/integration/test_downpour.py and tests/integration/test_faults.py."""

import pytest

from distbelief.config import JobConfig
from distbelief.launch import warmstart
from distbelief.launch.cluster import Event, Fault, ProcessKind, ProcessSpec
from distbelief.wire.security import WireSecurity

_ADDRESSES = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]


def _release(monkeypatch, replies, **fields):
    """A WarmstartRelease for a job with a 100-update warm start (``fields`` change it), the
    shards ready; the shards answer ``replies``. Returns it, its messages and the requests
    (``release.times``: each message's time on the records' clock)."""
    config = JobConfig().with_fields({"optimizer.warmstart_steps": 100, **fields})
    messages: list[str] = []
    requests: list = []

    def end_warmstart(addresses, timeout_s, **options):
        requests.append(dict(addresses) if isinstance(addresses, dict) else list(addresses))
        return replies

    monkeypatch.setattr(warmstart, "end_warmstart", end_warmstart)
    times: list[float | None] = []

    def message(text: str, time_s: float | None) -> None:
        messages.append(text)
        times.append(time_s)

    release = warmstart.WarmstartRelease(config, WireSecurity(), message)
    release.times = times
    release.shards_ready(_ADDRESSES)
    return release, messages, requests


@pytest.mark.parametrize(
    "fault",
    [
        Fault("worker0", 1.0, -9, "restarted"),
        Fault("worker1", 1.0, -9, "given up"),
        Fault("worker1.stage0", 1.0, -9, "given up"),
        Fault("shard0", 1.0, -9, "given up"),
    ],
    ids=["worker0-restarted", "another-worker", "another-replicas-stage", "a-shard"],
)
def test_only_worker0_given_up_ends_the_warm_start(monkeypatch, fault):
    release, messages, requests = _release(monkeypatch, ([5, 5], {}))
    release.on_fault(fault)
    assert (messages, requests) == ([], [])


@pytest.mark.parametrize("process", ["worker0", "worker0.stage1"])
def test_worker0_given_up_during_the_warm_start_ends_it_once_and_says_so(monkeypatch, process):
    release, messages, requests = _release(monkeypatch, ([42, 40], {}))
    release.on_fault(Fault(process, 1.0, -9, "given up"))
    release.on_fault(Fault(process, 2.0, -9, "given up"))
    assert requests == [_ADDRESSES]
    assert messages == [
        "worker0 was given up during its warm start: the other workers start now, from the "
        "shards' parameters after 40 of its 100 warm-start updates"
    ]
    # At the death's time: the latest record's came before it.
    assert release.times == [1.0]


def test_worker0_given_up_after_the_warm_start_says_nothing_of_it(monkeypatch):
    release, messages, requests = _release(monkeypatch, ([100, 130], {}))
    release.on_fault(Fault("worker0", 1.0, -9, "given up"))
    assert (messages, requests) == ([], [_ADDRESSES])


@pytest.mark.parametrize(
    "fields",
    [
        {"optimizer.warmstart_steps": 0},
        {"cluster.num_workers": 1},
    ],
    ids=["no-warm-start", "no-other-worker"],
)
def test_no_one_waiting_means_nothing_to_end(monkeypatch, fields):
    release, messages, requests = _release(monkeypatch, ([5], {}), **fields)
    release.on_fault(Fault("worker0", 1.0, -9, "given up"))
    assert (messages, requests) == ([], [])


def test_shards_that_cannot_be_told_are_named(monkeypatch):
    failed = {"shard0": "ShardUnavailableError: down", "shard1": "ShardTimeoutError: slow"}
    release, messages, _ = _release(monkeypatch, ([], failed))
    release.on_fault(Fault("worker0", 1.0, -9, "given up"))
    [message] = messages
    assert message.startswith("worker0 was given up during its warm start, and no shard could")
    assert "shard0: ShardUnavailableError: down; shard1: ShardTimeoutError: slow" in message


def _ready(kind: ProcessKind, index: int, address: str) -> Event:
    return Event("ready", ProcessSpec(kind, index), {"shard_id": index, "address": address})


def test_a_shard_that_listens_after_the_warm_start_ended_is_told_again(monkeypatch):
    """A restarted shard forgets the warm start ended; one told just before it died was told in
    vain. Either way the shard is told once it listens again (one shard: the workers would wait
    out their hold timeout)."""
    release, messages, requests = _release(monkeypatch, ([40, 40], {}))
    release.on_ready(_ready(ProcessKind.SHARD, 1, _ADDRESSES[1]))  # still in the warm start
    assert requests == []
    release.on_fault(Fault("worker0", 1.0, -9, "given up"))
    release.on_ready(_ready(ProcessKind.SHARD, 1, "tcp://127.0.0.1:3"))
    release.on_ready(_ready(ProcessKind.WORKER, 1, ""))  # only shards are told
    assert requests == [_ADDRESSES, {1: "tcp://127.0.0.1:3"}]
    assert release.addresses == [_ADDRESSES[0], "tcp://127.0.0.1:3"]
    assert len(messages) == 1  # the workers started when the first shards were told


def test_a_shard_restarted_as_the_warm_start_ended_is_told_once_it_listens(monkeypatch):
    """No shard could be told (the only one was down, restarting): the workers start when it
    listens again and is told."""
    release, messages, _ = _release(monkeypatch, ([], {"shard0": "down"}))
    release.shards_ready(_ADDRESSES[:1])
    release.on_fault(Fault("worker0", 1.0, -9, "given up"))
    assert "a shard that restarts is told once it listens" in messages[-1]
    monkeypatch.setattr(warmstart, "end_warmstart", lambda addresses, *_, **__: ([0], {}))
    release.on_ready(_ready(ProcessKind.SHARD, 0, _ADDRESSES[0]))
    assert messages[-1] == (
        "shard0 listens again and was told the warm start is over: the other workers start now"
    )
