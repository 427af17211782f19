"""Shard lanes: one connection and one ordered request lane per shard, requests retried while a
shard is unreachable, and the bytes and latencies of what was answered.

Each shard has its own connection and its own lane (one I/O thread), so requests to one shard run
in the order they were issued (a pull issued after a push sees that push) while different shards
are served in parallel. A call that waits for its answer may run one shard's request on the
calling thread, which would otherwise sit idle. Every wait has a timeout. The steps each shard
took from a restarted worker's dead life (``held_steps``) are kept here too: both clients' pushes
leave those shards out. The dense client (``ps_client.py``) and the row client (``rows.py``) are
both made of these lanes.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import operator
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence

from distbelief.config import check_count, check_wait
from distbelief.errors import (
    ClosedError,
    HeldTooLongError,
    ShardTimeoutError,
    ShardUnavailableError,
)
from distbelief.hosts import parse_addresses
from distbelief.wire import Message, connect
from distbelief.wire.retry import retry_while_unreachable
from distbelief.wire.security import WireSecurity

RECENT_KEPT = 4096
"""Per reporting window, the latencies (and a dense client's push stalenesses) kept: the most
recent this many. A loop that never takes its figures (``DownpourSGD`` in a script of one's
own) would otherwise grow by a value per request for as long as it runs."""


class WireFigures:
    """Bytes and latencies of answered requests, per reporting window (thread-safe). Bytes
    count the tensors a request or reply carried, through the socket or shared memory; the
    latency percentiles are those of the window's last ``RECENT_KEPT`` requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes_pushed = 0
        self._bytes_pulled = 0
        self._latencies_s: deque[float] = deque(maxlen=RECENT_KEPT)

    def record(self, request: Message, reply: Message, latency_s: float) -> None:
        pushed = sum([t.nbytes for _, t in request.tensors]) if request.tensors else 0
        pulled = sum([t.nbytes for _, t in reply.tensors]) if reply.tensors else 0
        with self._lock:
            self._bytes_pushed += pushed
            self._bytes_pulled += pulled
            self._latencies_s.append(latency_s)

    def add_shared(self, *, pushed: int = 0, pulled: int = 0) -> None:
        """Bytes a push left in, or a pull copied from, memory shared with a shard on this
        host: moved without the socket, counted all the same."""
        with self._lock:
            self._bytes_pushed += pushed
            self._bytes_pulled += pulled

    def take(self) -> dict[str, float | None]:
        with self._lock:
            pushed, pulled, latencies = self._bytes_pushed, self._bytes_pulled, self._latencies_s
            self._bytes_pushed, self._bytes_pulled = 0, 0
            self._latencies_s = deque(maxlen=RECENT_KEPT)
        latencies = sorted(latencies)

        def percentile_ms(fraction: float) -> float | None:
            if not latencies:
                return None
            return 1000 * latencies[min(len(latencies) - 1, int(fraction * len(latencies)))]

        return {
            "bytes_pushed": pushed,
            "bytes_pulled": pulled,
            "latency_p50_ms": percentile_ms(0.5),
            "latency_p99_ms": percentile_ms(0.99),
        }


class _Finished:
    """A call that already ran on the caller's thread: the done-future subset ``wait`` reads.

    Lighter than a ``Future`` (no condition variable), which is most of an inline call's cost.
    """

    __slots__ = ("_error", "_value")

    def __init__(self, value, error: BaseException | None) -> None:
        self._value, self._error = value, error

    def done(self) -> bool:
        return True

    def exception(self) -> BaseException | None:
        return self._error

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


class _Lane:
    """One shard's ordered request queue: a single I/O thread, or the caller when it is idle.

    Running a request on the thread that is about to wait for it saves two thread wake-ups
    (~60-250 us on a busy 2-core machine, more than a whole 1M-element push's Python cost).
    It is only allowed while nothing is queued, so requests still reach the shard in order.

    The I/O thread is a daemon: a program that ends (Ctrl-C, say) while a shard is down must
    not wait for requests that retry for ``retry_timeout_s`` (a thread pool's workers are
    joined at exit). It is still waited for, briefly, before the interpreter finalizes
    (``_release``). ``DownpourSGD.close`` is what flushes pushes on a normal exit.
    """

    def __init__(self, name: str, owner: str, shard: str) -> None:
        self._name = name
        self._owner = owner
        self._shard = shard
        """The shard it serves, as a waiter names it: ``shard 0 (ADDRESS)``."""
        """The client's class, named when it is used after close()."""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._pending = 0
        # Held while a request uses the connection: a queued request waits for an inline one.
        self._channel = threading.Lock()
        self._ended = False
        self._end_hooks: list[Callable[[], object]] = []

    def _run(self, fn, args):
        try:
            with self._channel:
                return fn(*args)
        finally:
            with self._lock:
                self._pending -= 1

    def _serve(self) -> None:
        # Each request is served in a call of its own: while this thread waits for the next,
        # it holds no reference to the last one's client, which may then be collected.
        while self._serve_one(self._queue.get()):
            pass
        with self._lock:
            self._ended = True
            hooks, self._end_hooks = self._end_hooks, []
        for hook in hooks:
            hook()

    def _serve_one(self, item: tuple | None) -> bool:
        """Run one queued request; False for the sentinel that stops the lane."""
        if item is None:
            return False
        future, fn, args = item
        if not future.set_running_or_notify_cancel():
            with self._lock:
                self._pending -= 1
            return True
        try:
            future.set_result(self._run(fn, args))
        except BaseException as error:  # handed to the waiter
            future.set_exception(error)
        return True

    def submit(self, fn, *args) -> cf.Future:
        future: cf.Future = cf.Future()
        with self._lock:
            if self._closed:
                raise ClosedError(self._owner, "a request")
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((future, fn, args))
        future.shard = self._shard  # type: ignore[attr-defined]
        return future

    def run_now(self, fn, *args) -> cf.Future | _Finished:
        """Run on this thread if the lane is idle (a finished call), else queue (a future)."""
        with self._lock:
            idle = self._pending == 0 and not self._closed
            if idle:
                self._pending += 1
        if not idle:
            return self.submit(fn, *args)
        try:
            return _Finished(self._run(fn, args), None)
        except Exception as error:  # handed to the waiter, as an I/O thread would
            return _Finished(None, error)

    def stop(self, *, cancel: bool) -> None:
        """Stop taking requests; ``cancel``: drop the queued ones (their futures are
        cancelled), else they still run, in order, before the lane's thread ends."""
        with self._lock:
            self._closed = True
        while cancel:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
                with self._lock:
                    self._pending -= 1
        self._queue.put(None)

    def join(self, deadline: float) -> bool:
        """Wait, until ``deadline`` (``time.monotonic()``) at most, for the lane's thread to end
        after :meth:`stop`; whether it has (never when called on that thread itself)."""
        thread = self._thread  # no new one once stopped
        if thread is None:
            return True
        if thread is threading.current_thread():
            return False  # the last reference to its client, dropped on its own thread
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    def after_end(self, hook: Callable[[], object]) -> None:
        """Run ``hook`` on the lane's thread as it ends after :meth:`stop` (at once if it has
        ended, or never started)."""
        with self._lock:
            if self._thread is not None and not self._ended:
                self._end_hooks.append(hook)
                return
        hook()


STOP_WAIT_S = 5.0
"""How long stopping a client at once waits for its lanes' requests in flight: one waiting for
a shard is woken at once; one inside a torch call (a copy from shared memory) ends within
milliseconds. Past it, the lane is left to end by itself."""


def _release(lanes: list[_Lane], transports: list, closing: threading.Event, owned: list) -> None:
    """What ``close(wait=False)`` does, also for lanes dropped without it or still open when the
    interpreter exits: queued requests are cancelled, the ones in flight woken and waited for
    (up to ``STOP_WAIT_S``), then the connections (and ``owned``, what else the client holds
    open) close.

    The wait matters at exit: a daemon thread that comes back from a torch call (which let go
    of the GIL) once the interpreter is finalizing is ended where it stands, and C++ aborts the
    whole process ("terminate called without an active exception", exit -6) in place of the
    program's own exit, its Ctrl-C's included.
    """
    closing.set()
    for lane in lanes:
        lane.stop(cancel=True)
    for transport in transports:
        transport.interrupt()
    deadline = time.monotonic() + STOP_WAIT_S
    ended = [lane.join(deadline) for lane in lanes]
    # Only the thread using a connection may close it: a lane still running (or the one this
    # runs on, the client's last reference dropped there) closes its own as it ends, and what
    # it may be reading (``owned``: shared memory) stays mapped until the last one has.
    late = [lane for lane, lane_ended in zip(lanes, ended, strict=True) if not lane_ended]
    countdown = [len(late)]
    countdown_lock = threading.Lock()

    def close_owned_after_the_last() -> None:
        with countdown_lock:
            countdown[0] -= 1
            last = countdown[0] == 0
        if last:
            for resource in owned:
                resource.close()

    for lane, transport in zip(lanes, transports, strict=True):
        if lane in late:
            lane.after_end(functools.partial(_close_then, transport, close_owned_after_the_last))
        else:
            transport.close()
    if not late:
        for resource in owned:
            resource.close()


def _close_then(transport, then: Callable[[], object]) -> None:
    transport.close()
    then()


class ShardLanes:
    """Connections to every shard of a job, one ordered lane each.

    Args:
        addresses: One address per shard, in shard-id order.
        timeout_s: Limit for each request to a shard.
        connect_timeout_s: Limit for opening a TCP connection.
        retry_timeout_s: How long a shard may stay unreachable (restarting, say) before its
            requests fail; requests are retried with backoff meanwhile.
        security: Authentication key and TLS settings of the job.
        lane_name: The lanes' thread names are ``{lane_name}{shard_id}``.
        source_host: The address of this machine the connections leave from (default: the
            one the operating system picks).

    Raises:
        ValueError: a bad timeout, a malformed address, or ``source_host`` is no address of
            this machine.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retry_timeout_s: float = 60.0,
        security: WireSecurity | None = None,
        lane_name: str = "ps-shard",
        source_host: str | None = None,
    ) -> None:
        check_wait("timeout_s", timeout_s)
        check_wait("connect_timeout_s", connect_timeout_s)
        check_wait("retry_timeout_s", retry_timeout_s, zero_ok=True)
        if security is not None and not isinstance(security, WireSecurity):
            raise TypeError(f"security must be a WireSecurity, got {security!r}")
        if source_host is not None and not isinstance(source_host, str):
            raise TypeError(f"source_host must be a str, got {source_host!r}")
        # A string is one address or "a,b" (not a sequence of one-letter addresses).
        self.addresses = parse_addresses(addresses)
        self.timeout_s = timeout_s
        self.retry_timeout_s = retry_timeout_s
        self._wire = WireFigures()
        self._closing = threading.Event()
        self._unreachable = False
        # Only when given: a channel kind without the option (same-host memory) never sees it.
        source = {"source_host": source_host} if source_host else {}
        self._transports = [
            connect(
                address,
                name=f"shard {i} ({address})",
                connect_timeout_s=connect_timeout_s,
                security=security,
                **source,
            )
            for i, address in enumerate(self.addresses)
        ]
        owner = type(self).__name__
        self._lanes = [
            _Lane(f"{lane_name}{i}", owner, f"shard {i} ({address})")
            for i, address in enumerate(self.addresses)
        ]
        self._owned: list = []
        """What a subclass holds open beside the connections (``close()``), released with them."""
        self.held_steps = [0] * self.num_shards
        """Per shard, the last step whose push it holds already (a dead life's, set by a
        restarted worker: ``hold_steps``): a push of a step up to it leaves that shard out."""
        # A client dropped without close() would leave its lanes' threads waiting and its
        # connections (and each shard's end of them) open for as long as the process runs.
        # At exit too (before the interpreter finalizes): see ``_release``.
        self._released_when_collected = weakref.finalize(
            self, _release, self._lanes, self._transports, self._closing, self._owned
        )

    @property
    def num_shards(self) -> int:
        """The number of shards (one address each)."""
        return len(self.addresses)

    def hold_steps(self, applied_steps: Sequence[int | None] | None, argument: str) -> None:
        """Set ``held_steps`` from ``applied_steps``: per shard, the step of the last push it
        applied from this worker id's previous life (a restarted client's ``pushed_steps``;
        None: none), so that a shard is sent none of the steps up to it again.

        Raises:
            ValueError: ``applied_steps`` (named ``argument``) gives no step >= 0, or None,
                per shard.
        """
        held = list(applied_steps or [None] * self.num_shards)
        if len(held) != self.num_shards or not all(
            step is None or (type(step) is int and step >= 0) for step in held
        ):
            raise ValueError(
                f"{argument} must give a step >= 0 or None for each of the {self.num_shards} "
                f"shards, got {applied_steps!r}"
            )
        self.held_steps = [step or 0 for step in held]

    def checked_schedule(self, clock: object, name: str, versions: object) -> list[int] | None:
        """A request's ``clock`` and per-shard ``versions`` (``base_versions`` of a push,
        ``after_versions`` of a pull), checked before anything is sent: the versions as one
        integer per shard, or None where none were given.

        Raises:
            ValueError: ``clock`` is no integer >= 0, or ``versions`` not one integer >= 0 per
                shard; named as the argument.
        """
        check_count("clock", clock, least=0)
        if versions is None:
            return None
        try:
            checked = [operator.index(version) for version in versions]
        except TypeError:
            checked = None
        if checked is None or len(checked) != self.num_shards or min(checked, default=0) < 0:
            raise ValueError(
                f"{name} must be one integer >= 0 per shard ({self.num_shards}), got {versions!r}"
            )
        return checked

    def holds(self, shard_id: int, step: int | None) -> bool:
        """Whether shard ``shard_id`` took the push of ``step`` from a dead life already
        (``held_steps``): a push of it leaves that shard out. Step 0 (or None) is no step."""
        return step is not None and 0 < step <= self.held_steps[shard_id]

    @property
    def unreachable(self) -> bool:
        """Whether the last :meth:`wait` raised because a shard stayed unreachable or silent
        past the retry timeout (a later wait that succeeds clears it): a caller closing after
        it need not wait as long again for that shard."""
        return self._unreachable

    def _request(self, shard_id: int, message: Message, sink=None) -> Message:
        """One request, retried with backoff while the shard is unreachable or silent.

        Raises:
            ShardTimeoutError: still failing after ``retry_timeout_s``, its last attempt not
                answered in time (the shard is stopped, or its packets are dropped).
            ShardUnavailableError: still failing after ``retry_timeout_s`` otherwise.
        """
        # The first attempt inline, not through _attempt: it is every push's and pull's path.
        started_s = time.perf_counter()
        try:
            reply = self._transports[shard_id].request(message, timeout_s=self.timeout_s, sink=sink)
        except (ShardUnavailableError, ShardTimeoutError) as e:
            first_failure = e
        else:
            self._wire.record(message, reply, time.perf_counter() - started_s)
            return reply
        self._connection_lost(shard_id)
        return retry_while_unreachable(
            functools.partial(self._attempt, shard_id, message, sink),
            retry_timeout_s=self.retry_timeout_s,
            closing=self._closing,
            first_failure=first_failure,
            spent_s=time.perf_counter() - started_s,
        )

    def _connection_lost(self, shard_id: int) -> None:
        """Shard ``shard_id``'s connection failed and is about to be retried (on its lane):
        what a subclass holds for that connection alone is let go here, not on reconnect."""

    def _attempt(self, shard_id: int, message: Message, sink) -> Message:
        started_s = time.perf_counter()
        reply = self._transports[shard_id].request(message, timeout_s=self.timeout_s, sink=sink)
        self._wire.record(message, reply, time.perf_counter() - started_s)
        return reply

    def _submit(self, shard_id: int, fn, *args) -> cf.Future:
        return self._lanes[shard_id].submit(fn, shard_id, *args)

    def _submit_all(self, fn, per_shard_args: Sequence[tuple], now: bool) -> list:
        """``fn(i, *per_shard_args[i])`` for every shard; with ``now``, the last one runs on
        this thread (after the others are queued, so all shards work at once)."""
        futures = [self._submit(i, fn, *args) for i, args in enumerate(per_shard_args[:-1])]
        last = len(per_shard_args) - 1
        if now:
            futures.append(self._lanes[last].run_now(fn, last, *per_shard_args[last]))
        else:
            futures.append(self._submit(last, fn, *per_shard_args[last]))
        return futures

    def request_each(self, messages: Sequence[Message], sinks: Sequence | None = None) -> list:
        """Send ``messages[i]`` (distinct: each is numbered as sent) to shard i, reply tensors into
        ``sinks[i]``, every shard at once through the lanes with retries; returns the replies.

        Raises:
            ValueError: not one distinct message (and sink) per shard.
            RemoteError: a shard refused its request (the first refusal).
            ShardUnavailableError / ShardTimeoutError: as :meth:`wait`.
        """
        distinct = len({id(m) for m in messages}) == len(messages) == self.num_shards
        if not distinct or (sinks and len(sinks) != len(messages)):
            raise ValueError(f"{self.num_shards} shards need one distinct message (and sink) each")
        arguments = [(message, sinks[i] if sinks else None) for i, message in enumerate(messages)]
        return self.wait(self._submit_all(self._request, arguments, now=True))

    def take_wire_figures(self) -> dict[str, float | None]:
        """Bytes pushed and pulled and request latency percentiles since the last call."""
        return self._wire.take()

    def wait(self, futures: Sequence, timeout_s: float | None = None) -> list:
        """Results of ``futures``; re-raises the first failure.

        Raises:
            ShardTimeoutError: not all done within ``timeout_s`` (default: the request timeout
                plus a margin, since each future already carries its own request timeout).
        """
        limit_s = (
            timeout_s if timeout_s is not None else self.timeout_s + self.retry_timeout_s + 5.0
        )
        pending = [future for future in futures if not future.done()]
        if pending:
            pending = cf.wait(pending, timeout=limit_s).not_done
        for future in futures:
            error = None if future in pending else future.exception()
            if error is not None:
                # A pull held past hold_timeout_s was answered all along: the shard is up.
                self._unreachable = isinstance(
                    error, ShardUnavailableError | ShardTimeoutError
                ) and not isinstance(error, HeldTooLongError)
                raise error
        self._unreachable = bool(pending)
        if pending:
            shards = ", ".join(sorted({getattr(f, "shard", "?") for f in pending}))
            raise ShardTimeoutError(
                f"{len(pending)} shard request(s) pending after {limit_s:g}s: {shards}"
            )
        return [future.result() for future in futures]

    def close(self, wait: bool = True) -> None:
        """Close every connection; a request made after it raises ``ClosedError``.

        Args:
            wait: Finish queued requests first (each bounded by its timeout and retries).
                False: cancel them, stop retrying and wake the requests in flight at once,
                waiting only for those to end (up to ``STOP_WAIT_S``): a worker that is
                shutting down because something failed, or was interrupted.
        """
        if not wait:
            self._released_when_collected()  # once: a client closed so is not released again
            return
        self._released_when_collected.detach()
        deadline = time.monotonic() + self.timeout_s + self.retry_timeout_s + 5.0
        for lane in self._lanes:
            lane.stop(cancel=False)
        if not all([lane.join(deadline) for lane in self._lanes]):
            # Requests still queued past one's bound (a shard down, each retried in turn): they
            # are cancelled and the one in flight woken, as close(wait=False) does. Closing the
            # connections under the lanes' feet instead let them dial the shards again after
            # close() returned, and leave those connections open.
            _release(self._lanes, self._transports, self._closing, self._owned)
            return
        for transport in self._transports:
            transport.close()
        for resource in self._owned:
            resource.close()
