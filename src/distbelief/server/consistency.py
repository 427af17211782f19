"""How a shard orders updates from many workers: async, bounded staleness (SSP) or synchronous
rounds with backup workers, plus the worker liveness all three rely on.

Pure bookkeeping under the caller's lock: the shard decides when to wait and what to apply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Worker:
    clock: int
    offset: int
    last_seen_s: float
    departed: bool = False


@dataclass(slots=True)
class WorkerClocks:
    """Each worker's step count ("clock") and when it was last heard from.

    A worker that joins late starts level with the slowest live worker (its clock is offset),
    so a newcomer never holds the others back while it catches up from step 0.
    """

    liveness_timeout_s: float
    workers: dict[str, _Worker] = field(default_factory=dict)

    def touch(self, worker: str, clock: int, now_s: float | None = None) -> None:
        now_s = time.monotonic() if now_s is None else now_s
        entry = self.workers.get(worker)
        if entry is None or entry.departed:
            slowest = self.slowest_clock(now_s)
            offset = max(0, slowest - clock) if slowest is not None else 0
            self.workers[worker] = _Worker(clock, offset, now_s)
            return
        entry.clock = max(entry.clock, clock)
        entry.last_seen_s = now_s

    def depart(self, worker: str) -> None:
        if worker in self.workers:
            self.workers[worker].departed = True

    def is_live(self, entry: _Worker, now_s: float) -> bool:
        return not entry.departed and now_s - entry.last_seen_s < self.liveness_timeout_s

    def live_count(self, now_s: float | None = None) -> int:
        now_s = time.monotonic() if now_s is None else now_s
        return sum(self.is_live(entry, now_s) for entry in self.workers.values())

    def dead_count(self, now_s: float | None = None) -> int:
        now_s = time.monotonic() if now_s is None else now_s
        return sum(not self.is_live(entry, now_s) for entry in self.workers.values())

    def effective_clock(self, worker: str) -> int | None:
        entry = self.workers.get(worker)
        return None if entry is None else entry.clock + entry.offset

    def slowest_clock(self, now_s: float | None = None) -> int | None:
        now_s = time.monotonic() if now_s is None else now_s
        clocks = [e.clock + e.offset for e in self.workers.values() if self.is_live(e, now_s)]
        return min(clocks) if clocks else None

    def too_far_ahead(self, worker: str, max_staleness: int, now_s: float | None = None) -> bool:
        """Whether ``worker`` must wait for the slowest live worker (SSP)."""
        clock, slowest = self.effective_clock(worker), self.slowest_clock(now_s)
        return clock is not None and slowest is not None and clock - slowest > max_staleness
