"""The retry policy of the request layer: it keeps trying until the retry timeout has passed,
the last wait cut short, and then gives up with the caller's error (by default, one of the
last failure's kind)."""

from __future__ import annotations

import threading
import time

import pytest

from distbelief.errors import ShardTimeoutError, ShardUnavailableError
from distbelief.wire.retry import retry_while_unreachable

RETRY_TIMEOUT_S = 0.5


class FlakyPeer:
    """Unreachable until ``down_s`` after it was made."""

    def __init__(self, down_s: float) -> None:
        self.back_at = time.monotonic() + down_s
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if time.monotonic() < self.back_at:
            raise ShardUnavailableError("peer unreachable")
        return "answered"


def test_a_peer_back_before_the_retry_timeout_but_after_the_last_backoff_is_reached():
    # Attempts at 0.05, 0.15, 0.35, 0.75 and 1.55 s find the peer away; the next backoff (1.6 s)
    # would overshoot the 3 s timeout, so the last wait is cut to end at the timeout, where one
    # more attempt is made. The peer is back 1.2 s before that: a machine too busy to try again
    # in time would have to hold this thread that long between one attempt and the next.
    peer = FlakyPeer(1.8)
    answer = retry_while_unreachable(
        peer,
        retry_timeout_s=3.0,
        closing=threading.Event(),
        give_up=ShardUnavailableError,
    )
    assert answer == "answered"


def test_a_peer_that_stays_away_is_given_up_after_the_retry_timeout():
    peer = FlakyPeer(60.0)
    started = time.monotonic()
    with pytest.raises(ShardUnavailableError, match=r"gave up after retrying for 0.5s"):
        retry_while_unreachable(
            peer,
            retry_timeout_s=RETRY_TIMEOUT_S,
            closing=threading.Event(),
            give_up=ShardUnavailableError,
        )
    assert time.monotonic() - started >= RETRY_TIMEOUT_S
    assert peer.calls >= 4


def test_a_closing_caller_gives_up_at_once():
    closing = threading.Event()
    closing.set()
    peer = FlakyPeer(60.0)
    with pytest.raises(ShardUnavailableError):
        retry_while_unreachable(
            peer, retry_timeout_s=60.0, closing=closing, give_up=ShardUnavailableError
        )
    assert peer.calls == 1


def test_the_retry_timeout_counts_from_the_callers_first_attempt():
    # The caller's own first attempt already took the whole retry timeout (a 5 s connect
    # bound against a 3 s retry timeout): no second attempt starts after it.
    peer = FlakyPeer(60.0)
    with pytest.raises(ShardUnavailableError, match=r"retrying for 3s; 5\.\ds in all"):
        retry_while_unreachable(
            peer,
            retry_timeout_s=3.0,
            closing=threading.Event(),
            give_up=ShardUnavailableError,
            first_failure=ShardUnavailableError("hello timed out after 5s connecting"),
            spent_s=5.0,
        )
    assert peer.calls == 0


@pytest.mark.parametrize("kind", [ShardTimeoutError, ShardUnavailableError])
def test_without_a_callers_error_it_gives_up_with_the_last_failures_kind(kind):
    """A peer that never answers in time (stopped, behind a black hole) is told from one that
    cannot be reached (refused, reset)."""
    failures = [ShardUnavailableError, ShardTimeoutError]
    failures.remove(kind)

    def peer() -> str:
        # The other kind first, then only ``kind``: the last failure decides.
        raise (failures.pop() if failures else kind)("shard 0: push failed")

    with pytest.raises(kind, match=r"^shard 0: push failed \(gave up after retrying"):
        retry_while_unreachable(peer, retry_timeout_s=RETRY_TIMEOUT_S, closing=threading.Event())
