"""Shard counters for live progress: one STATS request per shard, turned into ``shard`` metrics
records (pushes/s, bytes/s, version, mean staleness) by differencing successive polls. Only
reads counters; never changes a shard, and never fails a job (a shard that does not answer is
left out of that poll).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from distbelief.config import check_wait
from distbelief.errors import PSError
from distbelief.hosts import parse_addresses
from distbelief.telemetry.metrics import make_record
from distbelief.wire import Message, connect, ops

logger = logging.getLogger(__name__)

POLL_EVERY_S = 1.0
"""Default seconds between two polls of every shard."""

POLL_TIMEOUT_S = 1.0
"""Default limit for one shard's STATS request; the poll runs on the launcher's thread."""


def poll_shard_stats(
    addresses: Sequence[str], timeout_s: float, **connect_options: Any
) -> list[dict]:
    """Asks every shard for its counters, over a fresh connection closed right after.

    Args:
        addresses: one address per shard, in shard-id order (a list, or one string "a,b").
        timeout_s: limit for connecting to and for the STATS request of each shard.
        **connect_options: passed to ``distbelief.wire.connect`` (e.g. a backend's security
            settings).

    Returns:
        One dict per shard, in order: the shard's STATS reply (``shard_id``, ``version``,
        ``num_pushes``, ``num_pulls``, ``num_dropped``, ``staleness`` histogram,
        ``bytes_received``, ``bytes_sent``, ...) plus ``address`` and ``time`` (the
        ``time.time()`` at which the reply arrived).

    Raises:
        ValueError: ``timeout_s`` is not a number of seconds > 0, or an address is malformed.
        ShardTimeoutError: a shard did not answer within ``timeout_s``.
        ShardUnavailableError: a shard cannot be reached.
    """
    check_wait("timeout_s", timeout_s)
    stats = []
    for shard_id, address in enumerate(parse_addresses(addresses)):
        transport = connect(
            address,
            name=f"shard {shard_id} ({address})",
            connect_timeout_s=timeout_s,
            **connect_options,
        )
        try:
            reply = transport.request(Message(ops.STATS), timeout_s=timeout_s)
        finally:
            transport.close()
        stats.append({**reply.meta, "address": address, "time": time.time()})
    return stats


def _pushes_by_staleness(stats: dict) -> dict[int, int]:
    return {int(staleness): int(count) for staleness, count in stats.get("staleness", {}).items()}


def _mean_staleness(now: dict[int, int], before: dict[int, int]) -> float | None:
    delta = {s: count - before.get(s, 0) for s, count in now.items()}
    num_pushes = sum(delta.values())
    if num_pushes <= 0:
        return None
    return sum(s * count for s, count in delta.items()) / num_pushes


def _row_counts(stats: dict) -> dict[str, int]:
    """A shard's live, admitted and evicted rows and its ids awaiting admission, over its
    tables (none: no fields)."""
    tables = stats.get("rows", {}).get("tables", {})
    if not tables:
        return {}
    return {
        "rows": sum(t["rows"] for t in tables.values()),
        "rows_admitted": sum(t["admitted"] for t in tables.values()),
        "rows_evicted": sum(t["evicted"] for t in tables.values()),
        "rows_pending": sum(t["pending"] for t in tables.values()),
    }


_COUNTERS = ("num_pushes", "bytes_received", "bytes_sent", "bytes_shared")


def _restarted_between(before: dict, now: dict) -> bool:
    """Whether the shard was restarted between two polls: another life (a shard that tracks
    checkpoints names it), or a counter lower than before."""
    lives = [(stats.get("durable") or {}).get("life") for stats in (before, now)]
    if None not in lives and lives[0] != lives[1]:
        return True
    return any(now.get(key, 0) < before.get(key, 0) for key in _COUNTERS)


def _bytes_moved(stats: dict) -> int:
    """Bytes to and from a shard by any path: its socket, and shared memory on its host (a
    shard from before ``bytes_shared`` reports none)."""
    return stats["bytes_received"] + stats["bytes_sent"] + stats.get("bytes_shared", 0)


def shard_records(stats: Sequence[dict], previous: Sequence[dict] | None = None) -> list[dict]:
    """``shard`` metrics records from one poll, with rates since the ``previous`` poll.

    Args:
        stats: the result of ``poll_shard_stats``.
        previous: the poll before (matched by ``shard_id``); None or a missing shard gives
            records with a version but no rates, as does a shard restarted between the polls.

    Returns:
        One record per shard: ``time_s`` (wall clock, as children report it), ``version``,
        and, given a previous poll, ``pushes_per_s``, ``bytes_per_s`` (received plus sent,
        through its socket or shared memory) and ``staleness`` (mean over the pushes in
        between; None if there were none); a
        shard with embedding tables adds ``rows``, ``rows_admitted``, ``rows_evicted`` and
        ``rows_pending``.
    """
    before_by_id = {s["shard_id"]: s for s in previous or ()}
    records = []
    for now in stats:
        before = before_by_id.get(now["shard_id"])
        if before is not None and _restarted_between(before, now):
            before = None  # its counters started again from 0: no rate spans the restart
        rates: dict[str, float | None] = {}
        elapsed_s = now["time"] - before["time"] if before is not None else 0.0
        if before is not None and elapsed_s > 0:
            num_bytes, num_bytes_before = _bytes_moved(now), _bytes_moved(before)
            rates = {
                "pushes_per_s": (now["num_pushes"] - before["num_pushes"]) / elapsed_s,
                "bytes_per_s": (num_bytes - num_bytes_before) / elapsed_s,
                "staleness": _mean_staleness(
                    _pushes_by_staleness(now), _pushes_by_staleness(before)
                ),
            }
        records.append(
            make_record(
                "shard",
                now["shard_id"],
                time_s=now["time"],
                version=now["version"],
                **rates,
                **_row_counts(now),
            )
        )
    return records


class ShardStatsPoller:
    """Polls every shard at most every ``every_s`` and returns ``shard`` records.

    Args:
        addresses: one address per shard, in shard-id order (a list, or one string "a,b").
        every_s: least seconds between two polls.
        timeout_s: limit for each shard's connection and request.
        **connect_options: passed to ``distbelief.wire.connect``.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        every_s: float = POLL_EVERY_S,
        timeout_s: float = POLL_TIMEOUT_S,
        **connect_options: Any,
    ) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.addresses = list(addresses)
        self.every_s = every_s
        self.timeout_s = timeout_s
        self._connect_options = connect_options
        self._previous: list[dict] = []
        self._next_poll = time.monotonic()

    def poll_if_due(self, *, now: bool = False) -> list[dict]:
        """The records of a fresh poll if ``every_s`` has passed since the last (or ``now``:
        without rates when under half of ``every_s`` has), else [].

        A shard that does not answer (it may be stopping at the end of the job) makes this
        poll return [] and is logged at debug level; it never raises a PSError.
        """
        clock_s = time.monotonic()
        if clock_s < self._next_poll and not now:
            return []
        # A poll asked for ``now`` soon after the last (the last one, as training ends) has
        # no rates: over a few milliseconds they said 0 pushes/s, the display's last word.
        too_soon = clock_s < self._next_poll - self.every_s / 2
        self._next_poll = clock_s + self.every_s
        try:
            stats = poll_shard_stats(self.addresses, self.timeout_s, **self._connect_options)
        except PSError as e:
            logger.debug("shard stats poll failed: %s", e)
            return []
        records = shard_records(stats, None if too_soon else self._previous)
        if not too_soon:
            self._previous = stats
        return records
