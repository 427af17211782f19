"""Serving thousands of connections with a few threads: idle connections wait in the kernel's
poller (epoll), and a small pool of serving threads takes each one when its next frame starts,
reads and answers that frame with the same blocking frame code as a thread per connection, and
hands it back.

Every serving thread waits in epoll itself and each connection is registered one-shot, so the
kernel wakes one thread per ready connection, in the order connections became ready (FIFO:
fair), and no thread hands a connection to another (a selector thread feeding a queue costs a
wake-up more per request). A serving thread that waits long (a handler inside ``long_wait``, a
held pull; or a request still unfinished after a stall time, a peer stalling mid-frame) is
replaced meanwhile, so the other connections go on being served. Linux only (one-shot epoll).
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable, Iterator

from distbelief.wire.server_connection import ServerConnection

logger = logging.getLogger(__name__)

POOL_AVAILABLE = hasattr(select, "epoll")
"""Whether this platform has the one-shot poller the pool needs."""

STALL_S = 0.5
"""By default, a request still being served after this long gets its thread replaced while it
lasts."""
_MONITOR_S = 0.1
_POLL_S = 0.2
"""How often an idle serving thread looks at the stop flag."""

_local = threading.local()


@contextlib.contextmanager
def long_wait() -> Iterator[None]:
    """Mark a wait inside a handler that may last long (a pull held for slower workers): on a
    serving pool, another thread serves the other connections meanwhile. Elsewhere (a thread per
    connection) it does nothing."""
    worker = getattr(_local, "worker", None)
    if worker is None:
        yield
        return
    worker.pool.park(worker)
    try:
        yield
    finally:
        worker.pool.unpark(worker)


class _Worker:
    """One serving thread's bookkeeping (read and written under the pool's lock)."""

    __slots__ = ("busy_since", "parked", "pool", "serving")

    def __init__(self, pool: ServingPool) -> None:
        self.pool = pool
        self.serving: ServerConnection | None = None
        self.busy_since: float | None = None
        self.parked = False
        """Counted out of the active threads: in a long wait, or stalled."""


class ServingPool:
    """Idle connections in one-shot epoll, served by ``num_threads`` threads (more while some
    are parked, up to ``max_threads``).

    Args:
        serve_ready: Serves a connection whose next frame has started. True: watch it again;
            False: close it; None: let it go to ``release``.
        close: Closes a connection the pool drops (its peer left, it failed, or the pool stops).
        release: Takes over a connection the pool no longer watches (still open).
        num_threads: Serving threads that are not parked.
        max_threads: Serving threads in all, parked ones included.
        name: For the threads' names.
        stall_s: A request still being served after this long counts as parked.
    """

    def __init__(
        self,
        serve_ready: Callable[[ServerConnection], bool | None],
        close: Callable[[ServerConnection], None],
        release: Callable[[ServerConnection], None],
        *,
        num_threads: int,
        max_threads: int,
        name: str,
        stall_s: float = STALL_S,
    ) -> None:
        if not POOL_AVAILABLE:
            raise RuntimeError("a serving pool needs epoll (Linux)")
        self._serve_ready = serve_ready
        self._close = close
        self._release = release
        self._num_threads = num_threads
        self._max_threads = max(max_threads, num_threads)
        self._name = name
        self._stall_s = stall_s
        self._epoll = select.epoll()
        self._armed = select.EPOLLIN | select.EPOLLONESHOT
        self._lock = threading.Lock()
        self._by_fd: dict[int, ServerConnection] = {}
        self._workers: dict[_Worker, threading.Thread] = {}
        self._num_parked = 0
        self._stopping = threading.Event()
        with self._lock:
            self._start_threads()
        self._monitor = threading.Thread(target=self._watch, name=f"{name} monitor", daemon=True)
        self._monitor.start()

    @property
    def num_threads(self) -> int:
        """Serving threads now, parked ones included."""
        return len(self._workers)

    def add(self, connection: ServerConnection) -> bool:
        """Watch an opened connection for its next frame; False: the pool is stopping."""
        assert connection.channel is not None
        fd = connection.channel.fileno()  # type: ignore[attr-defined]
        with self._lock:
            if self._stopping.is_set():
                return False
            self._by_fd[fd] = connection
            self._epoll.register(fd, self._armed)
        return True

    def _start_threads(self) -> None:
        """Enough threads that ``num_threads`` are not parked (under the lock)."""
        while (
            len(self._workers) - self._num_parked < self._num_threads
            and len(self._workers) < self._max_threads
            and not self._stopping.is_set()
        ):
            worker = _Worker(self)
            thread = threading.Thread(
                target=self._run, args=(worker,), name=f"{self._name} serving", daemon=True
            )
            self._workers[worker] = thread
            thread.start()

    def _surplus(self, worker: _Worker) -> bool:
        """Whether this idle thread is one too many (others came back from long waits)."""
        if len(self._workers) - self._num_parked <= self._num_threads:
            return False
        with self._lock:
            if len(self._workers) - self._num_parked <= self._num_threads:
                return False
            del self._workers[worker]
            return True

    def _run(self, worker: _Worker) -> None:
        _local.worker = worker
        poll = self._epoll.poll
        while not self._stopping.is_set() and not self._surplus(worker):
            try:
                events = poll(_POLL_S, 1)
            except OSError:  # the poller is closed: the pool stopped
                break
            if events:
                self._serve(worker, events[0][0])

    def _serve(self, worker: _Worker, fd: int) -> None:
        with self._lock:
            connection = self._by_fd.get(fd)
            if connection is None or self._stopping.is_set():
                return  # stop() closes it
            worker.serving, worker.busy_since = connection, time.monotonic()
        outcome = self._serve_ready(connection)
        with self._lock:
            worker.serving = worker.busy_since = None
            if worker.parked:
                worker.parked = False
                self._num_parked -= 1
            keep = bool(outcome) and not self._stopping.is_set()
            try:
                if keep:
                    self._epoll.modify(fd, self._armed)
            except OSError:
                keep = False
            if not keep:
                del self._by_fd[fd]
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
        # Only now, with its descriptor out of the poller: closed by another thread, the
        # descriptor could be reused by a new connection that the pool is watching.
        if keep:
            return
        if outcome is None:
            self._release(connection)
        else:
            self._close(connection)

    def park(self, worker: _Worker) -> None:
        """``worker`` waits long: start another thread if too few are left active."""
        with self._lock:
            if not worker.parked:
                worker.parked = True
                self._num_parked += 1
                self._start_threads()

    def unpark(self, worker: _Worker) -> None:
        with self._lock:
            if worker.parked:
                worker.parked = False
                self._num_parked -= 1

    def _watch(self) -> None:
        """Parks threads whose request has lasted longer than the stall time."""
        while not self._stopping.wait(_MONITOR_S):
            now = time.monotonic()
            with self._lock:
                stalled = [
                    worker
                    for worker in self._workers
                    if not worker.parked
                    and worker.busy_since is not None
                    and now - worker.busy_since > self._stall_s
                ]
                for worker in stalled:
                    worker.parked = True
                    self._num_parked += 1
                if stalled:
                    self._start_threads()

    def stop(self, deadline: float) -> None:
        """Close the idle connections, wake the threads serving the others (each closes its
        own) and join every thread until ``deadline`` (``time.monotonic()``)."""
        with self._lock:
            self._stopping.set()
            serving = {worker.serving for worker in self._workers}
            idle = [c for c in self._by_fd.values() if c not in serving]
            for connection in serving:
                if connection is not None:
                    connection.shutdown()
            self._by_fd = {fd: c for fd, c in self._by_fd.items() if c in serving}
            threads = list(self._workers.values())
        for connection in idle:
            self._close(connection)
        for thread in [*threads, self._monitor]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._epoll.close()
