"""Which ranks a ParameterServer gives up on: a worker's connections closed past the grace
period, or no connection within the join timeout; a reconnecting worker is never given up."""

from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server.presence import WorkerPresence
from distbelief.server.rank_watch import RankWatch
from distbelief.wire import Message, ops

GRACE_S = 10.0
JOIN_S = 300.0


def _watch(presence: WorkerPresence) -> RankWatch:
    return RankWatch([1, 2], presence, grace_s=GRACE_S, join_timeout_s=JOIN_S, now_s=0.0)


def test_presence_counts_every_connection_of_a_worker():
    presence = WorkerPresence()
    assert presence.absence_s("w", now_s=5.0) is None
    presence.arrive("w")
    presence.arrive("w")  # a second connection (another shard group, a reconnect)
    presence.leave("w", now_s=5.0)
    assert presence.absence_s("w", now_s=50.0) == 0.0
    presence.leave("w", now_s=6.0)
    assert presence.absence_s("w", now_s=50.0) == 44.0
    presence.leave("stranger")  # never arrived: ignored
    presence.arrive("w")
    assert presence.absence_s("w", now_s=60.0) == 0.0


def test_a_rank_whose_connections_stay_closed_past_the_grace_is_lost_once():
    presence = WorkerPresence()
    watch = _watch(presence)
    for worker in ("w1", "w2"):
        presence.arrive(worker)
    workers = {1: "w1", 2: "w2"}
    assert watch.update([1, 2], workers, now_s=1.0) == {}
    presence.leave("w2", now_s=20.0)  # killed
    assert watch.update([1, 2], workers, now_s=20.0 + GRACE_S) == {}  # not past the grace yet
    lost = watch.update([1, 2], workers, now_s=21.0 + GRACE_S)
    assert lost == {2: "left without finishing (its connections closed 11s ago)"}
    assert watch.update([1, 2], workers, now_s=40.0) == {}  # named once
    assert watch.lost == {2: "left without finishing (its connections closed 20s ago)"}
    assert watch.update([2], workers, now_s=41.0) == {}  # rank 1 finished: only 2 is left
    assert set(watch.lost) == {2}


def test_a_rank_that_reconnects_within_the_grace_or_after_is_not_lost():
    presence = WorkerPresence()
    watch = _watch(presence)
    presence.arrive("w1")
    presence.leave("w1", now_s=5.0)
    presence.arrive("w1")  # its next request reconnected
    assert watch.update([1], {1: "w1"}, now_s=100.0) == {}
    presence.leave("w1", now_s=100.0)
    assert set(watch.update([1], {1: "w1"}, now_s=200.0)) == {1}
    presence.arrive("w1")  # back after all
    watch.update([1], {1: "w1"}, now_s=201.0)
    assert watch.lost == {}


def test_a_rank_that_never_connects_is_lost_after_the_join_timeout():
    presence = WorkerPresence()
    watch = _watch(presence)
    assert watch.update([1, 2], {}, now_s=JOIN_S) == {}
    # Rank 2 looks the server up late: its own join timeout starts then.
    assert watch.update([1, 2], {2: "w2"}, now_s=JOIN_S) == {}
    lost = watch.update([1, 2], {2: "w2"}, now_s=JOIN_S + 1.0)
    assert lost == {1: "never connected (waited 300s for its DownpourSGD)"}
    assert set(watch.update([1, 2], {2: "w2"}, now_s=2 * JOIN_S + 1.0)) == {2}
    presence.arrive("w2")
    watch.update([1, 2], {2: "w2"}, now_s=2 * JOIN_S + 2.0)
    assert set(watch.lost) == {1}


def test_the_service_reports_a_workers_connections_from_its_hello_on():
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
    service = ShardService(shard)
    first, second = service.open_connection("10.0.0.1:1"), service.open_connection("10.0.0.1:2")
    for connection in (first, second):
        connection._hello(Message(ops.HELLO, {"worker": "w", "clock": 0}))
    assert shard.presence.absence_s("w") == 0.0
    first.close()
    assert shard.presence.absence_s("w") == 0.0  # one connection still open
    second.close()
    absence_s = shard.presence.absence_s("w")
    assert absence_s is not None and absence_s >= 0.0
    assert "w" not in shard.clocks.workers  # a hello does not join the clocks
