"""Leaving a Ray job is not cut short by a second Ctrl-C or SIGTERM (a user pressing Ctrl-C
twice, or ``timeout`` signalling the launcher and then its group): the actors are stopped and
Ray is left as found (the embedded instance shut down, its folder removed), then the signal
is acted on. The stop asks a Sandblaster coordinator to stop, and waits for it, before the
workers go. Needs no Ray: the stop itself, or what it calls of Ray, is replaced."""

from __future__ import annotations

import signal
import time
from types import SimpleNamespace

import pytest

from distbelief.launch.cluster import ProcessKind, ProcessSpec
from distbelief.launch.ray_cluster import RayCluster


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_while_stopping_waits_for_the_stop(signum):
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)  # as the launcher's: a KeyboardInterrupt
    try:
        cluster = RayCluster.__new__(RayCluster)
        steps: list[str] = []

        def stop_all() -> None:
            steps.append("actors stopped")
            signal.raise_signal(signum)  # the second signal, while stopping
            steps.append("Ray left as found")

        cluster.stop_all = stop_all
        with pytest.raises(KeyboardInterrupt):
            cluster.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert steps == ["actors stopped", "Ray left as found"]


class _Links:
    """The cluster's event listener, faked: a process's link closes at the next read once it
    was asked to stop (its stop flag) or its actor killed."""

    def __init__(self, names: list[str], steps: list[str]) -> None:
        self.open, self.ending, self.steps = set(names), set(), steps

    def linked(self, name: str) -> bool:
        return name in self.open

    def get(self, _timeout_s: float) -> None:
        for name in sorted(self.ending & self.open):
            self.open.discard(name)
            self.steps.append(f"{name} gone")
        time.sleep(0.01)

    def send_stop(self, name: str) -> None:
        self.steps.append(f"{name} asked to stop")
        self.ending.add(name)

    def close(self) -> None:
        pass


def test_a_sandblaster_coordinator_is_asked_to_stop_and_waited_for_before_the_workers_go():
    """It commits a checkpoint of the iteration under way while the workers still compute (it
    was killed with them: a resumed run went on from the last periodic checkpoint)."""
    specs = [
        ProcessSpec(ProcessKind.SHARD, 0),
        ProcessSpec(ProcessKind.WORKER, 0),
        ProcessSpec(ProcessKind.WORKER, 1),
        ProcessSpec(ProcessKind.COORDINATOR, 0),
    ]
    steps: list[str] = []
    cluster = RayCluster.__new__(RayCluster)
    cluster.events = links = _Links([spec.name for spec in specs], steps)
    cluster._lives = {
        spec.name: SimpleNamespace(spec=spec, ref=spec.name, returned_at=None) for spec in specs
    }
    cluster.book = SimpleNamespace(stopping=False, given_up=set())
    cluster._results, cluster._stopped = {}, set()
    cluster._actors = {spec.name: spec.name for spec in specs}
    cluster._hosts, cluster._placement, cluster._failed = [], None, False
    cluster._session = SimpleNamespace(close=lambda keep_logs: None)

    def kill(actor: str, no_restart: bool) -> None:
        if actor in links.open:
            steps.append(f"{actor} killed")
            links.ending.add(actor)

    cluster._ray = SimpleNamespace(
        kill=kill,
        wait=lambda refs, num_returns, timeout: links.get(timeout),
        util=SimpleNamespace(remove_placement_group=lambda placement: None),
    )
    cluster.stop_all()
    assert steps == [
        "coordinator asked to stop",
        "coordinator gone",
        "worker0 killed",
        "worker1 killed",
        "worker0 gone",
        "worker1 gone",
        "shard0 asked to stop",
        "shard0 gone",
    ]
