"""Retrying a request while its peer is unreachable or silent: backoff from 50 ms doubling to
2 s, until a given time has passed since the first attempt began (the last wait is cut short so
one more attempt is made right at that time), stopped at once when the caller is closing. One
policy for every client of the request layer (shards' and the coordinator's); giving up raises
the caller's error, or by default one of the last failure's kind (timeout or unreachable)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from distbelief.errors import PSError, ShardTimeoutError, ShardUnavailableError

logger = logging.getLogger(__name__)

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0

T = TypeVar("T")


def retry_while_unreachable(
    call: Callable[[], T],
    *,
    retry_timeout_s: float,
    closing: threading.Event,
    give_up: Callable[[str], Exception] | None = None,
    first_failure: ShardUnavailableError | ShardTimeoutError | None = None,
    spent_s: float = 0.0,
) -> T:
    """``call()``, again with backoff while it raises ShardUnavailableError or
    ShardTimeoutError, until ``retry_timeout_s`` has passed: a peer that is reachable again
    before then is reached (an attempt then starts no later than at that time, and takes up to
    the request's own timeout). ``first_failure``: the caller's own
    first attempt already failed so (the common, successful path then costs the caller no
    closure and no call of this function); the first retry waits the first delay.
    ``spent_s``: how long that first attempt took; the retry timeout counts from its start.

    Raises:
        The exception ``give_up(message)`` makes (chained to the last failure): still failing
        after ``retry_timeout_s``, or ``closing`` was set. Without ``give_up``: ShardTimeoutError
        if the last attempt was not answered in time (a stopped peer, a black hole), else
        ShardUnavailableError.
    """
    started = time.monotonic() - spent_s
    deadline = started + retry_timeout_s
    delay_s = FIRST_DELAY_S
    failure = first_failure
    while True:
        if failure is None:
            try:
                return call()
            except (ShardUnavailableError, ShardTimeoutError) as e:
                failure = e
        remaining_s = deadline - time.monotonic()
        if closing.is_set() or remaining_s <= 0:
            elapsed_s = time.monotonic() - started
            message = (
                f"{failure} (gave up after retrying for {retry_timeout_s:g}s; "
                f"{elapsed_s:.1f}s in all)"
            )
            raise (give_up or _kind_of(failure))(message) from failure
        # Not the whole backoff when it would pass the deadline: giving up then would end the
        # retries up to MAX_DELAY_S early, and a peer back just before the deadline be missed.
        wait_s = min(delay_s, remaining_s)
        logger.warning("%s; retrying in %.2fs", failure, wait_s)
        closing.wait(wait_s)
        delay_s = min(delay_s * 2, MAX_DELAY_S)
        failure = None


def _kind_of(failure: ShardUnavailableError | ShardTimeoutError) -> type[PSError]:
    """The error to give up with after ``failure``: a timeout stays one, so a caller tells a
    peer that does not answer in time from one it cannot reach."""
    return ShardTimeoutError if isinstance(failure, ShardTimeoutError) else ShardUnavailableError
