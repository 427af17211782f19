"""Leaving a Ray job is not cut short by a second Ctrl-C or SIGTERM (a user pressing Ctrl-C
twice, or ``timeout`` signalling the launcher and then its group): the actors are stopped and
Ray is left as found (the embedded instance shut down, its folder removed), then the signal
is acted on. Needs no Ray: the stop itself is replaced."""

from __future__ import annotations

import signal

import pytest

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
