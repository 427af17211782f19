"""Which training ranks of a ParameterServer's job are gone without finishing: a rank whose
worker connected and then had every connection closed for longer than a grace period (killed,
say), or that never connected at all. Pure bookkeeping: the server reads the store and the
shard's connections and asks; this module touches neither.
"""

from __future__ import annotations

import time

from distbelief.server.presence import WorkerPresence


class RankWatch:
    """Tells, each time it is asked, which unfinished ranks are gone.

    Args:
        ranks: The training ranks.
        presence: The shard's connections per worker id.
        grace_s: How long a rank's connections may all stay closed before it counts as gone:
            a worker whose connection broke reconnects at its next request, well within it.
        join_timeout_s: How long a rank may take to connect at all, counted from the watch's
            start, or from when the rank registered a new worker id (it looked the server up).
        now_s: The start (default: now, on ``time.monotonic()``'s clock).
    """

    def __init__(
        self,
        ranks: list[int],
        presence: WorkerPresence,
        *,
        grace_s: float,
        join_timeout_s: float,
        now_s: float | None = None,
    ) -> None:
        started_s = time.monotonic() if now_s is None else now_s
        self._presence = presence
        self._grace_s = grace_s
        self._join_timeout_s = join_timeout_s
        self._awaited: dict[int, tuple[str | None, float]] = {
            rank: (None, started_s) for rank in ranks
        }
        """Per rank: the worker id it registered last (None: none yet), and since when."""
        self.lost: dict[int, str] = {}
        """Ranks gone without finishing -> why, as of the last :meth:`update`."""

    def update(
        self, unfinished: list[int], workers: dict[int, str], now_s: float | None = None
    ) -> dict[int, str]:
        """Look again at the ``unfinished`` ranks (``workers``: the worker id each registered,
        for those that did). A rank that is back (it reconnected) is no longer lost.

        Returns:
            The ranks found gone since the last update, with why.
        """
        now_s = time.monotonic() if now_s is None else now_s
        lost = {}
        for rank in unfinished:
            reason = self._why_gone(rank, workers.get(rank), now_s)
            if reason is not None:
                lost[rank] = reason
        newly = {rank: reason for rank, reason in lost.items() if rank not in self.lost}
        self.lost = lost
        return newly

    def _why_gone(self, rank: int, worker: str | None, now_s: float) -> str | None:
        absence_s = None if worker is None else self._presence.absence_s(worker, now_s)
        if absence_s is None:
            awaited, since_s = self._awaited[rank]
            if worker != awaited:  # a new worker id: it connects next
                self._awaited[rank] = (worker, now_s)
                return None
            if now_s - since_s <= self._join_timeout_s:
                return None
            return f"never connected (waited {self._join_timeout_s:g}s for its DownpourSGD)"
        if absence_s > self._grace_s:
            return f"left without finishing (its connections closed {absence_s:.0f}s ago)"
        return None
