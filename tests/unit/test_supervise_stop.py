"""A finished job's launcher waits for its evaluator and shards to exit; one that does not (a
process stopped with SIGSTOP, stuck on its disk) is waited on still, but not without a word."""

import time

from distbelief.config import JobConfig
from distbelief.launch import supervise
from distbelief.launch.cluster import ProcessKind
from distbelief.launch.supervise import EventRouter


class _Sink:
    def __init__(self):
        self.messages = []
        self.times = []

    def write(self, record):
        pass

    def message(self, text, time_s=None):
        self.messages.append(text)
        self.times.append(time_s)


class _SlowToStop:
    """Every process has finished but those of ``slow_kind`` (the shards), which exit
    ``shard_exit_s`` after being asked to, or (``until_said``) once ``sink`` has been told
    something: a launcher slow to look on a busy machine still finds them running."""

    def __init__(self, shard_exit_s, slow_kind=ProcessKind.SHARD, until_said=None):
        self.shard_exit_s = shard_exit_s
        self.slow_kind = slow_kind
        self.until_said = until_said
        self.asked = {}
        self.faults = []

    def stop(self, kind):
        self.asked[kind] = time.monotonic()

    def finished(self, kind):
        if kind is not self.slow_kind:
            return True
        if self.until_said is not None and self.until_said.messages:
            return True
        return time.monotonic() - self.asked[kind] >= self.shard_exit_s

    def next_event(self, timeout_s=0.2):
        time.sleep(min(timeout_s, 0.02))


_SAFETY_S = 60.0
"""Where a test's slow processes exit at the latest, said or not (the test then fails)."""


def test_shards_that_do_not_exit_are_waited_on_and_said_once(monkeypatch):
    monkeypatch.setattr(supervise, "STOP_NOTICE_S", 0.2)
    sink = _Sink()
    slow = _SlowToStop(shard_exit_s=_SAFETY_S, until_said=sink)
    supervise.supervise(slow, EventRouter(sink), JobConfig())
    assert sink.messages == [
        "the shards have not all exited 0s after the job asked them to stop (each saves its "
        "last checkpoint first); still waiting: Ctrl-C ends them"
    ]


def test_shards_that_exit_in_time_say_nothing(monkeypatch):
    monkeypatch.setattr(supervise, "STOP_NOTICE_S", 5.0)
    sink = _Sink()
    supervise.supervise(_SlowToStop(shard_exit_s=0.1), EventRouter(sink), JobConfig())
    assert sink.messages == []


def test_the_notice_is_timed_when_it_is_said_not_at_the_last_record(monkeypatch):
    """Its ``t=`` is metrics.csv's time axis: the workers started 100 s ago and the last record
    came then, but the notice is said now, 100 s in."""
    monkeypatch.setattr(supervise, "STOP_NOTICE_S", 0.2)
    sink = _Sink()
    route = EventRouter(sink)
    route(("started", None, {"time": time.time() - 100.0}))
    supervise.supervise(_SlowToStop(shard_exit_s=_SAFETY_S, until_said=sink), route, JobConfig())
    assert len(sink.times) == 1 and 100.0 <= sink.times[0] < 160.0


def test_sandblaster_workers_that_do_not_exit_once_told_to_stop_are_said_once(monkeypatch):
    """The coordinator has finished and told the workers to stop; one stopped with SIGSTOP
    holds the launcher, which says so rather than wait without a word."""
    monkeypatch.setattr(supervise, "STOP_NOTICE_S", 0.2)
    sink = _Sink()
    config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster"})
    cluster = _SlowToStop(_SAFETY_S, slow_kind=ProcessKind.WORKER, until_said=sink)
    supervise.supervise(cluster, EventRouter(sink), config)
    assert sink.messages == [
        "the workers have not all exited 0s after the job asked them to stop; still waiting: "
        "Ctrl-C ends them"
    ]


class _CoordinatorExitedFirst:
    """A Sandblaster coordinator whose exit is seen before the last of what it sent is read:
    the row of the iteration it committed as it stopped, then its result."""

    def __init__(self):
        from distbelief.launch.cluster import Event, ProcessSpec
        from distbelief.telemetry import make_record

        coordinator = ProcessSpec(ProcessKind.COORDINATOR, 0)
        row = make_record("coordinator", 0, time_s=1.0, step=20, loss=0.5)
        self.pending = [Event("metric", coordinator, row), Event("done", coordinator, {})]
        self._results = {}
        self.stopped = []

    def stop(self, kind):
        self.stopped.append(kind)

    def finished(self, kind):
        return True

    def exited(self, kind):
        return True

    def results(self, kind):
        return self._results

    def next_event(self, timeout_s=0.2):
        if not self.pending:
            time.sleep(min(timeout_s, 0.02))
            return None
        event = self.pending.pop(0)
        if event.kind == "done":
            self._results = {0: event.payload}
        return event


def test_a_coordinator_seen_exited_has_its_last_row_and_result_read():
    """The wait ended once the coordinator's exit was seen, leaving its last iteration's row
    and its result unread: summary.json said iterations 19, its committed checkpoint 20, and
    metrics.csv never had a row for 20 (a resume went on at 21)."""

    class _Rows(_Sink):
        def __init__(self):
            super().__init__()
            self.records = []

        def write(self, record):
            self.records.append(record)

    sink, cluster = _Rows(), _CoordinatorExitedFirst()
    config = JobConfig().with_fields({"optimizer.algorithm": "sandblaster"})
    supervise.stop_coordinator(cluster, EventRouter(sink), config)
    assert [record["step"] for record in sink.records] == [20]
    assert cluster.results(ProcessKind.COORDINATOR) == {0: {}}
    assert cluster.stopped == []  # exited already: nothing to ask
