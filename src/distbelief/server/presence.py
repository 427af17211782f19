"""Which workers have a connection open to a shard, and since when the last one of each closed:
what shows a worker that is gone between two of its requests (a killed process's sockets are
closed by its kernel). Bookkeeping only: the service reports the connections.
"""

from __future__ import annotations

import threading
import time

from distbelief.server.sessions import remember


class WorkerPresence:
    """Open connections per worker id, and when each worker's last one closed (thread-safe:
    connections open and close on the server's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._closed_at_s: dict[str, float] = {}

    def arrive(self, worker: str) -> None:
        """A connection of ``worker`` opened."""
        with self._lock:
            self._open[worker] = self._open.get(worker, 0) + 1
            self._closed_at_s.pop(worker, None)

    def leave(self, worker: str, now_s: float | None = None) -> bool:
        """A connection of ``worker`` closed; True if it was the worker's last one."""
        with self._lock:
            count = self._open.get(worker)
            if count is None:
                return False  # never arrived: nothing to close
            if count > 1:
                self._open[worker] = count - 1
                return False
            del self._open[worker]
            # Bounded: each DownpourSGD is a new worker id by default.
            remember(self._closed_at_s, worker, time.monotonic() if now_s is None else now_s)
            return True

    def absence_s(self, worker: str, now_s: float | None = None) -> float | None:
        """Seconds since the last of ``worker``'s connections closed: 0.0 while one is open,
        None if it never had one."""
        with self._lock:
            if worker in self._open:
                return 0.0
            closed_at_s = self._closed_at_s.get(worker)
        if closed_at_s is None:
            return None
        return (time.monotonic() if now_s is None else now_s) - closed_at_s
