"""LocalCluster: a job's processes on this host, as children of a forkserver that has torch and
the roles loaded already, so each starts in milliseconds. Pipes, stop flags, pids and exit codes
live only here; what a process runs is ``entry.run_role``, what a death means is ``cluster``'s.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing as mp
import multiprocessing.forkserver
import os
import signal
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from distbelief.errors import ChildFailedError, ClosedError
from distbelief.launch.child import EventInbox, SharedStopFlag, run_child
from distbelief.launch.cluster import (
    RESTART_POLICIES,
    STOP_GRACE_S,
    Event,
    Fault,
    ProcessBook,
    ProcessKind,
    ProcessSpec,
    cut_off_cause,
)
from distbelief.launch.deferred_signals import signals_deferred
from distbelief.launch.entry import PRELOADED_MODULES, run_role
from distbelief.launch.process_groups import in_a_process_group_of_their_own
from distbelief.launch.rundir import write_text_atomic

if TYPE_CHECKING:
    from collections.abc import Callable

    from distbelief.config import JobConfig

_POLL_S = 0.2

FORKSERVER_PRELOAD = (
    "__main__",
    "distbelief.launch.child",
    "distbelief.launch.entry",
    *PRELOADED_MODULES,
)
"""What the forkserver imports once before it forks any child. ``__main__`` (a script that calls
``train``): its children find it loaded instead of each re-running the script."""


SHARED_MEMORY_FOLDER = "/dev/shm"
"""Where Python's multiprocessing keeps, on Linux, the memory and semaphores that this
launcher's stop flags and its children's locks are made of."""


def check_processes_can_share() -> None:
    """Refuse, in one line, a host whose processes of this launcher could not share their
    stop flags (a container without a writable /dev/shm): multiprocessing failed with a bare
    OS error as the job started."""
    if not sys.platform.startswith("linux"):
        return
    folder = SHARED_MEMORY_FOLDER
    if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
        return
    if os.path.isdir(folder):
        why = "is not writable"
    else:
        why = "is not a folder" if os.path.lexists(folder) else "is missing"
    raise ValueError(
        f"this host's {folder} {why}: the local launcher's processes share their stop flags "
        "there; start the shards and workers by hand (distbelief ps, distbelief worker), "
        "which need none"
    )


def start_forkserver() -> None:
    """Starts the forkserver (in the background) with torch and the roles to import: call it
    first, so that its imports overlap whatever the launcher does before starting processes.
    A forkserver already running (an earlier job of this process) is kept.

    The forkserver, and so every child, goes into a process group of its own: a signal to the
    launcher's group (``timeout``'s SIGTERM, ``kill -TERM -PGID``) then reaches the launcher
    alone, which stops the job in order (the shards last, each saving a checkpoint). Reaching
    the forkserver too, it ended it at once, and the launcher took that for every child's death
    (exit code 255) and let them go before the shards had saved."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    if getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None) is not None:
        multiprocessing.forkserver.ensure_running()  # alive, or restarted where it died
        return
    with in_a_process_group_of_their_own():
        multiprocessing.forkserver.ensure_running()


def stop_forkserver() -> None:
    """Ends this process's forkserver once its jobs are over (the command line's last step).
    Left to itself it ends when this process does, but only after unloading torch: seconds in
    which it outlives the command. It has no SIGTERM handler of its own, so SIGTERM ends it at
    once; the standard library's stop then reaps it and forgets it."""
    server = multiprocessing.forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(OSError, AttributeError):
        server._stop()


class LocalCluster:
    """One job's processes on this host; a ``Cluster``. Use as a context manager: leaving it
    stops every process. Writes ``pids.json`` (process name -> pid) into ``run_dir`` at every
    start, so tools and tests can find a process.
    """

    @classmethod
    def warm_up(cls, config: JobConfig) -> None:
        """Starts, in the background, what starting processes will need (see
        ``Cluster.warm_up``)."""
        start_forkserver()

    def __init__(self, config: JobConfig, run_dir: Path) -> None:
        start_forkserver()
        from distbelief.wire.security import WireSecurity, generate_key

        self.config = config
        self.run_dir = run_dir
        self.ctx = mp.get_context("forkserver")
        self.book = ProcessBook(config)
        self._stopped = False
        """``stop_all()`` ran (the ``with`` block ended): no process starts any more."""
        self.events = EventInbox()
        self._stop_flags = {kind: SharedStopFlag(self.ctx) for kind in ProcessKind}
        # Children hold the reading end; EOF there tells them the launcher is gone.
        self._lifeline, self._lifeline_writer = self.ctx.Pipe(duplex=False)
        # The job's secret travels to children only inside the pickled process object, over
        # the forkserver's private socket and pipe: never argv or the environment.
        self.security = WireSecurity(auth_key=generate_key())
        self.processes: dict[str, tuple[ProcessSpec, Any]] = {}
        self.errors: dict[str, str] = {}
        self._errors_settled: set[str] = set()
        """The processes whose error was raised, or recorded as a fault of the stop."""
        self._ending_early = False
        """``begin_stop()`` ran: an error a process reports is a fault, not raised."""
        self._results: dict[str, Any] = {}
        self._backlog: collections.deque[Event] = collections.deque()
        self._signalled: dict[int, signal.Signals] = {}
        """Pid -> the signal the cluster ended it with: a death by it is no fault."""
        self.on_fault: Callable[[Fault], None] | None = None
        self.on_ready: Callable[[Event], None] | None = None

    @property
    def faults(self) -> list[Fault]:
        """The processes that died without reporting an error so far, or reported one while
        the job stopped, and what was done about each, oldest first."""
        return self.book.faults

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Not cut off by a second signal (``timeout`` sends SIGTERM to the launcher, then to
        # its group): the shards would be let go before their last checkpoint.
        with signals_deferred():
            self.stop_all()

    def _addresses(self) -> list[str]:
        return [self.book.addresses[i] for i in range(self.config.cluster.num_shards)]

    def start(self, kind: ProcessKind, index: int, stage: int = 0) -> None:
        """Starts one process (see ``Cluster.start``); a restart reuses this.

        Raises:
            ValueError: a process the job does not have (see ``ProcessBook.spec``).
            ClosedError: called after ``stop_all()`` (the end of the ``with`` block).
        """
        spec = self.book.spec(kind, index, stage)
        if self._stopped:
            raise ClosedError("LocalCluster", f"start of {spec.name}", after="stop_all()")
        addresses = [] if kind is ProcessKind.SHARD else self._addresses()
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=run_child,
            args=(
                spec.name,
                writer,
                self._lifeline,
                run_role,
                spec,
                self.config,
                addresses,
                self.security,
                self._stop_flags[kind],
            ),
            name=spec.name,
            daemon=True,
        )
        # A Ctrl-C between the forkserver's fork and the sending of the process object left a
        # child that printed a traceback (EOFError: nothing to unpickle), and one the cluster
        # did not know to stop: it takes effect once the process is started and recorded.
        with signals_deferred():
            process.start()
            writer.close()  # the child holds its end now; EOF here means the child is gone
            self.events.add(reader)
            self.processes[spec.name] = (spec, process)
            write_text_atomic(
                self.run_dir / "pids.json",
                json.dumps({n: p.pid for n, (_, p) in self.processes.items()}, indent=1),
            )

    def wait_for_shards(self, timeout_s: float) -> list[str]:
        """Waits until every shard listens; returns their addresses in shard-id order.

        Raises:
            ChildFailedError: a shard failed, or they were not all ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while len(self.book.addresses) < self.config.cluster.num_shards:
            if time.monotonic() > deadline:
                raise ChildFailedError("shards", None, f"not ready in {timeout_s:g}s")
            self.next_event(deadline - time.monotonic())
        return self._addresses()

    def wait_for_coordinator(self, timeout_s: float) -> str:
        """Waits until the coordinator listens; returns its address.

        Raises:
            ChildFailedError: it failed, or was not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while self.book.coordinator_address is None:
            if time.monotonic() > deadline:
                raise ChildFailedError("coordinator", None, f"not ready in {timeout_s:g}s")
            self.next_event(deadline - time.monotonic())
        return self.book.coordinator_address

    def wait_for_stage(self, rank: int, stage: int, timeout_s: float) -> str:
        """Waits until stage ``stage`` of replica ``rank`` listens; returns its address.

        Raises:
            ChildFailedError: it failed, or was not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while (rank, stage) not in self.book.stage_addresses:
            if time.monotonic() > deadline:
                name = ProcessSpec(ProcessKind.STAGE, rank, stage=stage).name
                raise ChildFailedError(name, None, f"not ready in {timeout_s:g}s")
            self.next_event(deadline - time.monotonic())
        return self.book.stage_addresses[(rank, stage)]

    def next_event(self, timeout_s: float = _POLL_S) -> Event | None:
        """The next child event; restarts processes that died; raises if a child reported an
        error or cannot be brought back (see ``Cluster.next_event``)."""
        if self._backlog:
            return self._backlog.popleft()
        raw = self.events.get(max(0.0, min(timeout_s, _POLL_S)))
        event = None if raw is None else self._event(raw)
        if event is not None:
            self._note(event)
        self._check_children()
        return event

    def _event(self, raw: tuple) -> Event:
        kind, name, payload = raw  # what run_child sends up its pipe
        return Event(kind, self.processes[name][0], payload)

    def _note(self, event: Event) -> None:
        if event.kind == "error":
            self.errors[event.source.name] = event.payload
        elif event.kind == "done":
            self._results[event.source.name] = event.payload
        self.book.note(event)
        if event.kind == "ready" and self.on_ready is not None:
            self.on_ready(event)

    def _check_children(self) -> None:
        for name, (spec, process) in list(self.processes.items()):
            if self.processes[name][1] is not process:
                continue  # replaced meanwhile (its replica was restarted)
            if process.exitcode in (None, 0) or self.book.restart_unit(spec) in self.book.given_up:
                continue
            self._drain_errors()
            if name in self.errors:
                self._settle_error(spec, process)
                continue
            fault = self.book.record_death(spec, process.exitcode, stopping=self.book.stopping)
            if self.on_fault is not None:
                self.on_fault(fault)
            if RESTART_POLICIES[spec.kind].restarts_replica:
                self._stop_replica(spec.index)
                # Their last pushes' events, sent before they were killed: the replica
                # resumes after the last push of its every stage.
                self._drain_errors()
            self.book.raise_if_fatal(spec, fault)
            if fault.action != "restarted":
                continue
            if RESTART_POLICIES[spec.kind].restarts_replica:
                # Each stage binds its old address and finds its next stage at its old one, so
                # the replica's stages start at once.
                for stage in range(self.config.pipeline.num_partitions):
                    self.start(spec.kind, spec.index, stage)
            else:
                self.start(spec.kind, spec.index)

    def _settle_error(self, spec: ProcessSpec, process: Any, *, announce: bool = True) -> None:
        """Process ``spec`` reported an error: it fails the job (raised), or, the job ending
        already (``begin_stop``), is a fault of the stop (given to ``on_fault`` if
        ``announce``). An error as a finished job's shards stop is both: a fault of the
        stop, as a death then is, that fails the job."""
        name = spec.name
        if name in self._errors_settled:
            return
        self._errors_settled.add(name)
        if self._ending_early or self.book.stopping:
            fault = self.book.record_error(spec, process.exitcode, self.errors[name])
            if announce and self.on_fault is not None:
                self.on_fault(fault)
        if not self._ending_early:
            raise ChildFailedError(name, process.exitcode, self.errors[name])

    def _stop_replica(self, rank: int) -> None:
        """Kill every stage of replica ``rank`` still running (its peers are gone or going)."""
        stages = [
            process
            for spec, process in self.processes.values()
            if spec.kind is ProcessKind.STAGE and spec.index == rank
        ]
        for process in stages:
            self._signal(process, signal.SIGKILL)
        _join_all(stages, STOP_GRACE_S)

    def _drain_errors(self) -> None:
        """Read what dead children sent before exiting (their pipes hold it all already)."""
        while (raw := self.events.get(0.0)) is not None:
            event = self._event(raw)
            self._note(event)
            self._backlog.append(event)

    def finished(self, kind: ProcessKind) -> bool:
        """Whether every process of ``kind`` has exited cleanly (or been given up on)."""
        return all(
            process.exitcode == 0 or self.book.restart_unit(spec) in self.book.given_up
            for spec, process in self.processes.values()
            if spec.kind is kind
        )

    def exited(self, kind: ProcessKind) -> bool:
        """Whether no process of ``kind`` is still running, however it ended."""
        return all(
            process.exitcode is not None
            for spec, process in self.processes.values()
            if spec.kind is kind
        )

    def begin_stop(self) -> None:
        """The job ends early: a process that dies from now on is given up (see
        ``Cluster.begin_stop``)."""
        self.book.stopping = True
        self._ending_early = True

    def stop(self, kind: ProcessKind) -> None:
        """Asks every process of ``kind`` to finish: the stop flag of its role; Downpour's workers
        and stages, which stop on no flag, get SIGTERM. Once the shards are asked, the job is
        stopping: no process is restarted."""
        if kind is ProcessKind.SHARD:
            self.book.stopping = True
        self._stop_flags[kind].set()
        sandblaster = self.config.optimizer.algorithm == "sandblaster"
        downpour = kind in (ProcessKind.WORKER, ProcessKind.STAGE) and not sandblaster
        if downpour:  # Downpour's workers and stages: SIGTERM, no flag
            for spec, process in self.processes.values():
                if spec.kind is kind:
                    self._signal(process, signal.SIGTERM)

    def results(self, kind: ProcessKind) -> dict[int, Any]:
        """What each finished process of ``kind`` returned, by index."""
        return {
            spec.index: self._results[name]
            for name, (spec, _) in self.processes.items()
            if spec.kind is kind and name in self._results
        }

    def stop_all(self) -> None:
        """Stop every child: workers and the evaluator first (SIGTERM), then the shards (their
        stop flag, so they write a last checkpoint), then whatever is left (SIGKILL).
        Sandblaster's coordinator is asked first (its stop flag): it ends the iteration under
        way and commits a checkpoint of it while the workers still compute, so a resumed run
        goes on from there, not from the last periodic checkpoint (up to --checkpoint-every
        earlier). A process that died meanwhile by another hand is a fault
        (``_note_deaths_while_stopping``)."""
        self.book.stopping = True
        self._stopped = True
        self._stop_flags[ProcessKind.EVALUATOR].set()
        coordinators = [p for s, p in self.processes.values() if s.kind is ProcessKind.COORDINATOR]
        if any(process.is_alive() for process in coordinators):
            self._stop_flags[ProcessKind.COORDINATOR].set()
            _join_all(coordinators, STOP_GRACE_S)
        clients = [p for s, p in self.processes.values() if s.kind is not ProcessKind.SHARD]
        shards = [p for s, p in self.processes.values() if s.kind is ProcessKind.SHARD]
        for process in clients:
            self._signal(process, signal.SIGTERM)
        _join_all(clients, STOP_GRACE_S)
        self._stop_flags[ProcessKind.SHARD].set()
        _join_all(shards, STOP_GRACE_S)
        for _, process in self.processes.values():
            self._signal(process, signal.SIGKILL)
        _join_all([p for _, p in self.processes.values()], STOP_GRACE_S)
        self._note_deaths_while_stopping()
        self._lifeline_writer.close()

    def _signal(self, process: Any, signum: signal.Signals) -> None:
        """Ends ``process`` with ``signum`` (SIGTERM or SIGKILL), if it still runs: its death
        by it is the cluster's doing, not a fault."""
        if process.is_alive():
            self._signalled[process.pid] = signum
            os.kill(process.pid, signum)

    def _ended_by_the_cluster(self, process: Any) -> bool:
        signum = self._signalled.get(process.pid)
        # SIGTERM ends a child through SystemExit(128 + SIGTERM), or at once before its handler.
        ended_by = {signal.SIGTERM: (-signal.SIGTERM, 128 + signal.SIGTERM)}
        return signum is signal.SIGKILL or process.exitcode in ended_by.get(signum, ())

    def _note_deaths_while_stopping(self) -> None:
        """Records as faults the processes that reported an error not raised yet, and those
        that died while the job stopped, by another hand than the cluster's (its SIGTERM to a
        client, its SIGKILL after the grace period), and not yet recorded: what they sent
        before is read first, so a shard that returned its result (and saved its last
        checkpoint) is known so. The cluster is stopping: nothing is restarted, and nothing
        raised (the job ends as it was ending)."""
        self._drain_errors()
        self._ending_early = True
        for name, (spec, process) in self.processes.items():
            if name in self.errors:
                # Shown by the launcher once the cluster has stopped (its display is closed).
                self._settle_error(spec, process, announce=False)
                continue
            if process.exitcode in (None, 0) or self.book.restart_unit(spec) in self.book.given_up:
                continue
            if self._ended_by_the_cluster(process):
                if not self._shard_cut_off(spec, process):
                    continue
                # Hung as it stopped (a Downpour shard's last checkpoint is not on disk: a
                # resume restores an older one).
                cause = cut_off_cause(self.config)
                self.book.record_death(spec, process.exitcode, stopping=True, cause=cause)
                continue
            self.book.record_death(spec, process.exitcode, stopping=True)

    def _shard_cut_off(self, spec: ProcessSpec, process: Any) -> bool:
        """Whether ``process`` is a shard this cluster killed after the stop's grace period
        without its result (after the checkpoint it saves on the way out, a Downpour shard's):
        hung, or stopped."""
        if spec.kind is not ProcessKind.SHARD:
            return False
        killed = self._signalled.get(process.pid) is signal.SIGKILL
        return killed and spec.name not in self.book.returned


def _join_all(processes: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
