"""RayCluster: a job's processes as Ray actors, one process each. Ray places them (the shards and
the coordinator spread over the nodes by a placement group), starts, watches and restarts them;
parameters and gradients travel on the project's own wire between the actors' processes, never
through Ray; events come back over event links (``remote_events``). What a death means is
``cluster``'s, as for the local launcher.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import pickle
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from distbelief.deferred_signals import signals_deferred
from distbelief.errors import ChildFailedError, ClosedError, ClusterError, LauncherInterrupted
from distbelief.launch.cluster import (
    STOP_GRACE_S,
    Event,
    Fault,
    ProcessBook,
    ProcessKind,
    ProcessSpec,
    cut_off_cause,
)
from distbelief.launch.entry import PRELOADED_MODULES
from distbelief.launch.ray_actor import NodeHost, RoleActor
from distbelief.launch.ray_endings import (
    Ending,
    death_of_call,
    ending_of_call,
    ending_of_error,
    ending_of_outcome,
    gone_for_good,
    is_death,
)
from distbelief.launch.ray_placement import (
    actor_options,
    check_resources,
    early_processes,
    num_cpus,
    placement_timeout_s,
    reserve_places,
)
from distbelief.launch.ray_session import (
    RaySession,
    check_address,
    import_ray,
    plain_lines_off_a_terminal,
    prepare_embedded,
    restore_environment,
)
from distbelief.launch.rundir import write_text_atomic

if TYPE_CHECKING:
    from collections.abc import Callable

    from distbelief.config import JobConfig

logger = logging.getLogger(__name__)

RESTART_TIMEOUT_S = 120.0
"""Longest wait for Ray to re-create a dead process's actor."""
RESULT_TIMEOUT_S = 10.0
"""Longest a process's result may trail the end of its run (it travels on its event link)."""
_POLL_S = 0.2


@dataclass
class _Life:
    """One run of one process: the call of its actor's ``run``."""

    spec: ProcessSpec
    ref: Any
    """The ObjectRef of the call: ready when the role ended or the process died."""
    placing: Any
    """The ObjectRef of the actor's ``placed`` call, made just before ``ref``'s: ready once
    Ray has given the actor its CPUs and made it (again, after a death); None after."""
    after_death: bool
    """Run on an actor that Ray is re-creating: a call that finds it not back yet is made
    again (it is no new death)."""
    started_at: float = field(default_factory=time.monotonic)
    link: int | None = None
    """The serial number of its event link, once its process linked back (it runs)."""
    returned_at: float | None = None


class RayCluster:
    """One job's processes as Ray actors; a ``Cluster``. Use as a context manager: leaving it
    stops every actor (and the embedded Ray instance, if the job started one). Writes
    ``pids.json`` (process name -> pid) and ``ray.json`` (the Ray address, the actors'
    namespace, each process's node) into ``run_dir`` as processes start.

    Raises:
        ClusterError: Ray cannot be joined, has too few CPUs for the job, or cannot place the
            shards within ``ray_placement.placement_timeout_s()``; ``next_event`` raises it when
            an actor started later (a worker, the evaluator, a restart) is not placed within
            that bound either.
    """

    @classmethod
    def warm_up(cls, config: JobConfig) -> None:
        """Imports Ray (ConfigFieldError if it is missing) and checks that a Ray head answers
        at the address (see ``check_address``); ValueError if ``DISTBELIEF_PLACEMENT_TIMEOUT_S``
        is malformed."""
        placement_timeout_s()
        plain_lines_off_a_terminal()
        try:
            if config.cluster.ray_address:
                check_address(config.cluster.ray_address)
            else:
                prepare_embedded()  # before Ray is imported: it reads some settings then
        except BaseException:
            restore_environment()  # a refused job leaves a script's environment as it was
            raise

    def __init__(self, config: JobConfig, run_dir: Path) -> None:
        from distbelief.wire.security import WireSecurity, generate_key

        # The actors run in other working folders (a node's, Ray's): paths as the launcher
        # sees them.
        config = config.with_fields(
            {
                "reporting.out_dir": str(Path(config.reporting.out_dir).resolve()),
                "data.data_dir": str(Path(config.data.data_dir).resolve()),
            }
        )
        self.config = config
        self.run_dir = run_dir
        self.book = ProcessBook(config)
        self.security = WireSecurity(auth_key=generate_key())
        self.namespace = f"distbelief-{uuid.uuid4().hex[:12]}"
        self.on_fault: Callable[[Fault], None] | None = None
        self.on_ready: Callable[[Event], None] | None = None
        self._lives: dict[str, _Life] = {}
        self._actors: dict[str, Any] = {}
        self._results: dict[str, Any] = {}
        self._stopped: set[str] = set()
        """Downpour workers stopped on request (they have no result)."""
        self._stop_requested: set[ProcessKind] = set()
        self._errors_settled: set[str] = set()
        """The processes whose error was raised, or recorded as a fault of the stop."""
        self._ending_early = False
        """``begin_stop()`` or ``stop_all()`` ran: an error a process reports is a fault, not
        raised."""
        self._placed: dict[str, dict] = {}
        self._backlog: collections.deque[Event] = collections.deque()
        self._failed = False
        self._hosts: list[Any] = []
        self._checked_at = 0.0
        self._session: RaySession | None = RaySession(config, num_cpus(config))
        try:
            self._ray = import_ray()
            check_resources(config, self._session.address)
            self._placement = reserve_places(config, self._session.address)
            from distbelief.launch.remote_events import EventListener

            self._actor_class = self._ray.remote(RoleActor)
            self._zygotes = self._start_node_hosts()
            host = self._ray.util.get_node_ip_address()
            self.events = EventListener(host, self.security.auth_key)
            for spec in early_processes(config):
                self._actor(spec)
        except BaseException:
            self._session.close(keep_logs=False)
            self._session = None
            raise

    @property
    def faults(self) -> list[Fault]:
        """The processes that died without reporting an error so far, or reported one while
        the job stopped, and what was done about each, oldest first."""
        return self.book.faults

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Ray's logs are kept for a failed job, not for one stopped by Ctrl-C or SIGTERM.
        stopped = exc_type is not None and issubclass(
            exc_type, (KeyboardInterrupt, LauncherInterrupted)
        )
        self._failed = exc_type is not None and not stopped
        # Not cut off by a second signal (Ctrl-C pressed again, or ``timeout`` signalling the
        # launcher, then its group): the shards would be let go before their last checkpoint,
        # and the embedded instance's folder left behind.
        with signals_deferred():
            self.stop_all()

    def _actor(self, spec: ProcessSpec) -> Any:
        """The actor of ``spec``'s process, created at its first start; Ray re-creates it (up
        to ``max_restarts`` times) after a death, on the same node when it is placed."""
        if spec.name not in self._actors:
            options = actor_options(self.config, spec, self.namespace, self._placement)
            self._actors[spec.name] = self._actor_class.options(**options).remote(spec.name)
        return self._actors[spec.name]

    def _addresses(self) -> list[str]:
        return [self.book.addresses[i] for i in range(self.config.cluster.num_shards)]

    def start(self, kind: ProcessKind, index: int, stage: int = 0) -> None:
        """Starts one process (see ``Cluster.start``); a restart reuses this.

        Raises:
            ValueError: a process the job does not have (see ``ProcessBook.spec``).
            ClosedError: called after ``stop_all()`` (the end of the ``with`` block: Ray is
                left, the embedded instance shut down).
        """
        assert kind is not ProcessKind.STAGE, "the config refuses partitions with Ray"
        spec = self.book.spec(kind, index, stage)
        if self._session is None:
            raise ClosedError("RayCluster", f"start of {spec.name}", after="stop_all()")
        placing, ref = self._run(spec)
        # A process started again after it returned (the evaluator, to evaluate once more)
        # runs until its new life's result comes.
        self._results.pop(spec.name, None)
        self._lives[spec.name] = _Life(spec, ref, placing, after_death=spec.name in self._lives)

    def _run(self, spec: ProcessSpec) -> tuple[Any, Any]:
        """Calls the actor's ``placed``, then its ``run`` (an actor runs its calls in order):
        their ObjectRefs."""
        addresses = [] if spec.kind is ProcessKind.SHARD else self._addresses()
        # Pickled here: the actor passes it on to its process unread (it never loads torch).
        payload = pickle.dumps((spec, self.config, addresses, self.security))
        actor = self._actor(spec)
        placing = actor.placed.remote()
        return placing, actor.run.remote(self.events.address, payload, self._zygotes)

    def _start_node_hosts(self) -> dict[str, str]:
        """One NodeHost (and so one zygote) on every node that has CPUs, before any process
        starts: node id -> zygote name. A node that joins later has none (its processes start
        as fresh interpreters). They take no CPU of the job's: they only fork."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        host_class = self._ray.remote(NodeHost)
        zygotes: dict[str, str] = {}
        for node in self._ray.nodes():
            if not node.get("Alive") or node.get("Resources", {}).get("CPU", 0) <= 0:
                continue
            node_id = node["NodeID"]
            name = f"{self.namespace}-{node_id[:16]}"
            strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
            self._hosts.append(
                host_class.options(
                    name=f"zygote-{node_id[:16]}",
                    namespace=self.namespace,
                    num_cpus=0,
                    max_restarts=self.config.faults.max_restarts,
                    scheduling_strategy=strategy,
                ).remote(name, list(PRELOADED_MODULES))
            )
            zygotes[node_id] = name
        return zygotes

    def _wait_until(self, ready: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise ChildFailedError(what, None, f"not ready in {timeout_s:g}s")
            self.next_event(deadline - time.monotonic())

    def wait_for_shards(self, timeout_s: float) -> list[str]:
        """Waits until every shard listens; returns their addresses in shard-id order.

        Raises:
            ChildFailedError: a shard failed, or they were not all ready within ``timeout_s``.
        """
        num_shards = self.config.cluster.num_shards
        self._wait_until(lambda: len(self.book.addresses) >= num_shards, "shards", timeout_s)
        return self._addresses()

    def wait_for_coordinator(self, timeout_s: float) -> str:
        """Waits until the coordinator listens; returns its address.

        Raises:
            ChildFailedError: it failed, or was not ready within ``timeout_s``.
        """
        self._wait_until(
            lambda: self.book.coordinator_address is not None, "coordinator", timeout_s
        )
        assert self.book.coordinator_address is not None
        return self.book.coordinator_address

    def wait_for_stage(self, rank: int, stage: int, timeout_s: float) -> str:
        """Never called: the config refuses partitioned replicas with the ray engine."""
        raise AssertionError("the config refuses partitions with Ray")

    def next_event(self, timeout_s: float = _POLL_S) -> Event | None:
        """The next event of any actor; restarts processes that died; raises if one reported
        an error or cannot be brought back (see ``Cluster.next_event``)."""
        if self._backlog:
            return self._backlog.popleft()
        raw = self.events.get(max(0.0, min(timeout_s, _POLL_S)))
        event = None if raw is None else self._take(raw)
        # At most every _POLL_S: a busy job's events come many times a second, and each check
        # is a call into Ray (a death is told sooner anyway, by its event link's end).
        if time.monotonic() - self._checked_at >= _POLL_S:
            self._checked_at = time.monotonic()
            # A SIGTERM's handler raising inside Ray's compiled calls (ray.wait) came out as
            # SystemError ("returned a result with an exception set"): the launcher failed
            # with a traceback, not stopped. The signal is taken once the calls returned.
            with signals_deferred():
                self._check_actors()
        return event

    def _take(self, raw: tuple) -> Event | None:
        """Notes one event of a link; a link's hello is the cluster's own (returns None)."""
        kind, name, payload = raw
        life = self._lives[name]
        if kind == "hello":
            life.link = payload.pop("link")
            self._note_placed(name, payload)
            return None
        if kind == "closed":
            # Its process is gone: sooner news of a death than the run's call (which Ray
            # fails only once it has re-created the actor); that call is ignored then.
            if payload == life.link and life.returned_at is None and self._running(name):
                self._died(life, ending_of_call(self._ray, life.ref))
            return None
        event = Event(kind, life.spec, payload)
        if kind == "error":
            self._settle_error(life.spec, payload)
            return None
        if kind == "done":
            self._results[name] = payload
        self.book.note(event)
        if kind == "ready" and self.on_ready is not None:
            self.on_ready(event)
        return event

    def _settle_error(self, spec: ProcessSpec, detail: str, *, announce: bool = True) -> None:
        """Process ``spec`` reported an error: it fails the job (raised), or, the job ending
        already (``begin_stop``), is a fault of the stop (given to ``on_fault`` if
        ``announce``). An error as a finished job's shards stop is both: a fault of the
        stop, as a death then is, that fails the job."""
        if spec.name in self._errors_settled:
            return
        self._errors_settled.add(spec.name)
        if self._ending_early or self.book.stopping:
            fault = self.book.record_error(spec, None, detail)
            if announce and self.on_fault is not None:
                self.on_fault(fault)
        if not self._ending_early:
            raise ChildFailedError(spec.name, None, detail)

    def _note_placed(self, name: str, info: dict) -> None:
        """A process started (its pid and node); a late starter of a kind told to stop
        already is told again."""
        self._placed[name] = info
        if self._lives[name].spec.kind in self._stop_requested:
            self.events.send_stop(name)
        pids = {n: placed["pid"] for n, placed in self._placed.items()}
        write_text_atomic(self.run_dir / "pids.json", json.dumps(pids, indent=1))
        assert self._session is not None
        record: dict[str, Any] = {"address": self._session.address, "namespace": self.namespace}
        if self._session.temp_dir is not None:
            record["temp_dir"] = self._session.temp_dir  # the embedded instance's files
        record["processes"] = self._placed
        write_text_atomic(self.run_dir / "ray.json", json.dumps(record, indent=1))

    def _running(self, name: str) -> bool:
        """Process ``name`` has neither finished nor been given up or stopped."""
        return not (name in self._results or name in self.book.given_up or name in self._stopped)

    def _check_actors(self) -> None:
        """Finds runs that ended: a died process is restarted or given up by its kind's
        policy; a finished one must deliver its result in time; an actor must be placed in
        time."""
        self._check_placed()
        pending = {
            life.ref: life
            for name, life in self._lives.items()
            if life.returned_at is None and self._running(name)
        }
        if pending:
            ready, _ = self._ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                self._ended(pending[ref])
        for name, life in self._lives.items():
            # One given up (its error a fault of the stop) returns nothing.
            late = life.returned_at is not None and name not in self._results
            late = late and name not in self.book.given_up
            if late and time.monotonic() - life.returned_at > RESULT_TIMEOUT_S:
                raise ChildFailedError(name, None, "its result never reached the launcher")

    def _check_placed(self) -> None:
        """Raises if an actor of a running process still waits for its CPUs
        ``placement_timeout_s()`` after its run was asked for: on a cluster busy with other jobs
        (its total CPUs are enough, its free ones are not) Ray would hold it, and the job,
        forever. A restart's actor is bound alike (the CPUs it gave up may be taken)."""
        waiting = {
            life.placing: life
            for name, life in self._lives.items()
            if life.placing is not None and self._running(name)
        }
        if not waiting:
            return
        ready, _ = self._ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        for ref in ready:
            waiting.pop(ref).placing = None
        oldest = min((life.started_at for life in waiting.values()), default=time.monotonic())
        timeout_s = placement_timeout_s()
        if time.monotonic() - oldest > timeout_s:
            # All that still wait are named: those started with the late one (a worker and
            # the evaluator, say) wait as long, give or take a poll.
            names = ", ".join(life.spec.name for life in waiting.values())
            assert self._session is not None
            raise ClusterError(
                f"Ray could not place {names} within {timeout_s:g}s "
                f"(the cluster at {self._session.address} is busy or too small)"
            )

    def _ended(self, life: _Life) -> None:
        """One run's call returned: the role ended, the process died, or (a run after a
        death) Ray had not re-created the actor yet."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayError

        self._drain()  # what it sent before: its link's hello, its result
        if self._lives[life.spec.name] is not life:
            return  # its link's end told of its death already
        try:
            outcome = self._ray.get(life.ref, timeout=RESULT_TIMEOUT_S)
        except ActorUnavailableError as e:
            if life.after_death and life.link is None:
                self._run_again(life)
            else:
                self._died(life, ending_of_error(e))
            return
        except RayActorError as e:
            self._died(life, ending_of_error(e))
            return
        except RayError as e:  # the actor's run itself failed
            raise ChildFailedError(life.spec.name, None, str(e)) from e
        if is_death(outcome):  # its process died, its actor lives on (it runs the next life)
            self._died(life, ending_of_outcome(outcome))
            return
        life.returned_at = time.monotonic()

    def _run_again(self, life: _Life) -> None:
        """The call of a restarted process found its actor still being re-created: again."""
        waited_s = time.monotonic() - life.started_at
        if waited_s > RESTART_TIMEOUT_S:
            raise ChildFailedError(
                life.spec.name, None, f"Ray did not bring it back within {RESTART_TIMEOUT_S:g}s"
            )
        life.placing, life.ref = self._run(life.spec)

    def _died(self, life: _Life, ending: Ending) -> None:
        spec = life.spec
        if not self._running(spec.name):  # it died after it finished, say
            life.returned_at = time.monotonic()
            return
        # An actor Ray will not re-create (ray.kill with no_restart, say) is given up at once:
        # each restart's call would fail at once, and count as one more death.
        actor = self._actors.get(spec.name)
        fault = self.book.record_death(
            spec,
            ending.exitcode,
            stopping=self.book.stopping,
            cause=ending.cause,
            restartable=actor is None or not gone_for_good(actor),
        )
        if self.on_fault is not None:
            self.on_fault(fault)
        if fault.action == "restarted":
            # Ray re-creates the actor (on the same node when placed): run it again there.
            self.start(spec.kind, spec.index)
            return
        self._kill(spec.name)
        self.book.raise_if_fatal(spec, fault)

    def _drain(self) -> None:
        while (raw := self.events.get(0.0)) is not None:
            event = self._take(raw)
            if event is not None:
                self._backlog.append(event)

    def finished(self, kind: ProcessKind) -> bool:
        """Whether no process of ``kind`` is still running."""
        return not any(
            self._running(name) for name, life in self._lives.items() if life.spec.kind is kind
        )

    def exited(self, kind: ProcessKind) -> bool:
        """Whether no process of ``kind`` is still running (as ``finished``)."""
        return self.finished(kind)

    def begin_stop(self) -> None:
        """The job ends early: a process that dies from now on is given up (see
        ``Cluster.begin_stop``)."""
        self.book.stopping = True
        self._ending_early = True

    def stop(self, kind: ProcessKind) -> None:
        """Asks every process of ``kind`` to finish: the stop flag of its role (one that starts
        later is told when it connects); Downpour's workers, which stop on no flag, are
        stopped outright. Once the shards are asked, the job is stopping: no process is
        restarted."""
        if kind is ProcessKind.SHARD:
            self.book.stopping = True
        self._stop_requested.add(kind)
        downpour = self.config.optimizer.algorithm == "downpour"
        for name, life in self._lives.items():
            if life.spec.kind is not kind:
                continue
            if downpour and kind is ProcessKind.WORKER:
                self._kill(name)
                self._stopped.add(name)
            else:
                self.events.send_stop(name)

    def results(self, kind: ProcessKind) -> dict[int, Any]:
        """What each finished process of ``kind`` returned, by index."""
        return {
            life.spec.index: self._results[name]
            for name, life in self._lives.items()
            if life.spec.kind is kind and name in self._results
        }

    def _wait_unlinked(self, names: list[str]) -> None:
        """Waits, up to ``STOP_GRACE_S``, until none of ``names`` has its link open (its end
        closes when its process ends), keeping the results that come meanwhile."""
        deadline = time.monotonic() + STOP_GRACE_S
        while any(map(self.events.linked, names)) and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                self._keep_outcome(self.events.get(_POLL_S))

    def _keep_outcome(self, raw: tuple | None) -> None:
        """A stopping process's result, if ``raw`` is one: it ended by itself (a run whose
        process's exit code was lost with its zygote must not read as a death then); or its
        error, a fault of the stop (shown by the launcher once the cluster has stopped)."""
        if raw is None or raw[0] not in ("done", "error"):
            return
        kind, name, payload = raw
        if kind == "error":
            self._settle_error(self._lives[name].spec, payload, announce=False)
            return
        self._results[name] = payload
        self._lives[name].returned_at = time.monotonic()

    def _kill(self, name: str) -> None:
        actor = self._actors.get(name)
        if actor is not None:
            with contextlib.suppress(Exception):  # gone already
                self._ray.kill(actor, no_restart=True)

    def _note_deaths_while_stopping(self, lives: list[_Life], timeout_s: float) -> None:
        """Records as faults the ``lives`` whose run ended in a death (not a result) while the
        job stopped, and that no fault records yet; waits up to ``timeout_s`` for their runs'
        ends. The job is stopping: nothing is restarted, and nothing raised (it ends as it was
        ending)."""
        lives = [
            life for life in lives if life.returned_at is None and self._running(life.spec.name)
        ]
        refs, ended = [life.ref for life in lives], []
        with contextlib.suppress(Exception):
            ended, _ = self._ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for life in lives:
            if life.ref not in ended:
                continue  # still running: this cluster ends it
            ending = death_of_call(self._ray, life.ref, RESULT_TIMEOUT_S)
            if ending is not None:
                self.book.record_death(
                    life.spec, ending.exitcode, stopping=True, cause=ending.cause
                )

    def _note_shards_cut_off(self, lives: list[_Life]) -> None:
        """Records as faults the shards of ``lives``, still running after the stop's grace
        period and killed next, that returned no result: hung (a Downpour shard's last
        checkpoint is not on disk, and a resume restores an older one)."""
        self._drain()  # a result sent meanwhile: its shard saved, and is exiting
        cause = cut_off_cause(self.config)
        for life in lives:
            if self._running(life.spec.name):
                self.book.record_death(life.spec, None, stopping=True, cause=cause)

    def stop_all(self) -> None:
        """Stops every actor: Sandblaster's coordinator first, by its stop flag (it ends the
        iteration under way and commits a checkpoint of it while the workers still compute, so
        a resumed run goes on from there), for up to a grace period; then the workers and the
        evaluator at once; then the shards by their stop flag (they write a last checkpoint),
        killed after a grace period; then leaves Ray (the embedded instance shuts down). A
        coordinator or shard that died meanwhile by another hand is a fault
        (``_note_deaths_while_stopping``)."""
        if self._session is None:
            return
        self.book.stopping = True
        self._ending_early = True
        coordinators = [
            n for n, life in self._lives.items() if life.spec.kind is ProcessKind.COORDINATOR
        ]
        for name in coordinators:
            self.events.send_stop(name)
        self._wait_unlinked(coordinators)
        # Only one whose process is gone: one still running is killed next, by this cluster.
        self._note_deaths_while_stopping(
            [self._lives[n] for n in coordinators if not self.events.linked(n)],
            RESULT_TIMEOUT_S,  # its process is gone: its run's end trails it
        )
        clients = [n for n, life in self._lives.items() if life.spec.kind is not ProcessKind.SHARD]
        for name in clients:
            self._kill(name)
        # Their ends closing says they are gone: stopped after them, the shards leave no one
        # behind retrying (and warning about it).
        self._wait_unlinked(clients)
        shards = [life for life in self._lives.values() if life.spec.kind is ProcessKind.SHARD]
        for life in shards:
            self.events.send_stop(life.spec.name)
        ended, waited = [], False
        with contextlib.suppress(Exception):
            refs = [life.ref for life in shards]
            ended, _ = self._ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S)
            waited = True
        # The results of those that ended, if they sent one (they are read off their links).
        self._wait_unlinked([life.spec.name for life in shards if life.ref in ended])
        self._note_deaths_while_stopping(shards, 0.0)  # waited for above
        if waited:
            self._note_shards_cut_off([life for life in shards if life.ref not in ended])
        for name in self._actors:
            self._kill(name)
        for host in self._hosts:  # after the processes: the zygotes fork no more
            with contextlib.suppress(Exception):
                self._ray.kill(host, no_restart=True)
        with contextlib.suppress(Exception):
            self._ray.util.remove_placement_group(self._placement)
        self.events.close()
        self._session.close(keep_logs=self._failed)
        self._session = None
