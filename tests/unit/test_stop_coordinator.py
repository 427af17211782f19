"""The launcher's wait for Sandblaster's coordinator as a job ends early: a coordinator that
has exited, however, is waited for no longer than its last events take to be read."""

from __future__ import annotations

import time

from distbelief.config import JobConfig
from distbelief.launch.cluster import ProcessKind
from distbelief.launch.supervise import EventRouter, stop_coordinator


class _FailedCoordinator:
    """A cluster whose coordinator exited 1 (it failed: its error was read already), so it
    returns no result and is not "finished" (that is an exit of 0, or a given-up process)."""

    def results(self, kind: ProcessKind) -> dict:
        return {}

    def finished(self, kind: ProcessKind) -> bool:
        return False

    def exited(self, kind: ProcessKind) -> bool:
        return kind is ProcessKind.COORDINATOR

    def stop(self, kind: ProcessKind) -> None:
        pass

    def next_event(self, timeout_s: float) -> None:
        time.sleep(timeout_s)


class _Records:
    def write(self, record: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def test_a_coordinator_that_failed_is_not_waited_for_the_request_timeout():
    """It was waited for until the job's request timeout (30 s by default) before the job
    said it failed, the workers retrying the gone coordinator meanwhile."""
    config = JobConfig.from_fields(
        {"optimizer.algorithm": "sandblaster", "faults.timeout_s": 120.0}
    )
    started = time.monotonic()
    stop_coordinator(_FailedCoordinator(), EventRouter(_Records()), config)
    assert time.monotonic() - started < 60.0


class _WorkersToldToStop:
    """The coordinator has finished its iterations and told the workers to stop (they
    returned), and waits for one that died to ask, before it returns its result 1 s on."""

    faults: list = []

    def __init__(self) -> None:
        self.result_at = time.monotonic() + 1.0

    def results(self, kind: ProcessKind) -> dict:
        if kind is ProcessKind.WORKER:
            return {0: {"steps": 5}}
        if kind is ProcessKind.COORDINATOR and time.monotonic() >= self.result_at:
            return {0: {"iterations": 10}}
        return {}

    def finished(self, kind: ProcessKind) -> bool:
        return False

    def exited(self, kind: ProcessKind) -> bool:
        return kind is ProcessKind.WORKER

    def stop(self, kind: ProcessKind) -> None:
        pass

    def next_event(self, timeout_s: float) -> None:
        time.sleep(min(timeout_s, 0.05))


class _Said(_Records):
    def __init__(self) -> None:
        self.said: list[str] = []

    def message(self, text: str, time_s: float | None = None) -> None:
        self.said.append(text)


def test_workers_that_returned_are_no_iteration_that_cannot_end():
    """Every worker exited, having returned (the coordinator told them to stop): the
    coordinator was said unable to end its iteration, and its result, due after its wait for
    a worker that died, went unread (summary.json's coordinator was its rows')."""
    config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster"})
    said, cluster = _Said(), _WorkersToldToStop()
    stop_coordinator(cluster, EventRouter(said), config)
    assert cluster.results(ProcessKind.COORDINATOR) == {0: {"iterations": 10}}
    assert not any("cannot end" in line for line in said.said), said.said
