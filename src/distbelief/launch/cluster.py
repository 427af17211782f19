"""The ``Cluster`` interface a job runs on, the kinds of process a job has, and what happens
when one dies: decided by its kind, never by its name. Implementations (local processes in
``local.py``; another engine is a new file) start, watch and restart processes; ``train``
only talks to this interface. Nothing here starts a process.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from distbelief.errors import ChildFailedError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity

CHECKPOINT_DIR = "checkpoints"
"""The shards' checkpoint folder inside the run folder."""

STOP_GRACE_S = 5.0
"""How long a process asked to stop is given before the next in the stopping order goes."""
CUT_OFF_CAUSE = (
    f"killed by the launcher {STOP_GRACE_S:g}s after it was asked to stop, before it saved its "
    "last checkpoint"
)
"""The cause of the fault of a shard the launcher killed as the job stopped, its last
checkpoint not saved (hung, or stopped with SIGSTOP)."""
HUNG_CAUSE = (
    f"killed by the launcher {STOP_GRACE_S:g}s after it was asked to stop, before it exited "
    "(hung, or stopped)"
)
"""That cause for a Sandblaster shard, which saves nothing on the way out (the coordinator
commits what is saved): whether its last state is on disk is ``last_checkpoint_saved``."""


def cut_off_cause(config: JobConfig) -> str:
    """The cause of the fault of a shard of ``config``'s job the launcher killed as it
    stopped."""
    return HUNG_CAUSE if config.optimizer.algorithm == "sandblaster" else CUT_OFF_CAUSE


class ProcessKind(enum.Enum):
    """What a process of a job does."""

    SHARD = "shard"
    WORKER = "worker"
    EVALUATOR = "evaluator"
    COORDINATOR = "coordinator"
    """Sandblaster's: runs L-BFGS on the shards' vectors and hands portions to the workers."""
    STAGE = "stage"
    """One partition of a model-parallel replica (its ``index`` is the replica's rank)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RestartPolicy:
    """What becomes of a process of one kind that dies without reporting an error."""

    resumes_from: str
    """What a restarted process starts from (every Cluster restarts it so)."""
    fatal_when_exhausted: bool
    """Out of restarts: True fails the job; False gives the process up and the job goes on
    (it fails only when every process of the kind is given up)."""
    restarts_replica: bool = False
    """The process is one stage of a replica: the replica's other stages are stopped and the
    whole replica is restarted (and given up) together; restarts count per replica."""


RESTART_POLICIES: dict[ProcessKind, RestartPolicy] = {
    ProcessKind.SHARD: RestartPolicy(
        resumes_from="its last checkpoint, on its old address", fatal_when_exhausted=True
    ),
    ProcessKind.WORKER: RestartPolicy(
        resumes_from="the shards' parameters, after its last push they applied",
        fatal_when_exhausted=False,
    ),
    ProcessKind.EVALUATOR: RestartPolicy(
        resumes_from="the shards' current parameters", fatal_when_exhausted=True
    ),
    ProcessKind.COORDINATOR: RestartPolicy(
        resumes_from="its last checkpoint (the shards go back to it too), on its old address",
        fatal_when_exhausted=True,
    ),
    ProcessKind.STAGE: RestartPolicy(
        resumes_from="the shards' parameters, after its replica's last push they applied, "
        "with the replica's other stages, each on its old address",
        fatal_when_exhausted=False,
        restarts_replica=True,
    ),
}


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process of a job and where it starts: what ``entry.run_role`` needs besides the job."""

    kind: ProcessKind
    index: int
    """Shard id, worker rank; 0 for the evaluator."""
    bind: str = ""
    """Shards and the coordinator: the address to listen on (port 0 at first; its old
    address on a restart)."""
    resume_step: int = 0
    """Workers and stages: the step a restarted one resumes at, its (replica's) last push
    every shard applied."""
    restarted: bool = False
    """Workers and stages: a life after a death, which pushes none of the steps whose pushes
    the shards took from its dead life (they may have taken one after ``resume_step``, in
    flight at the death; a stage's replica goes on from the least of its stages')."""
    coordinator: str = ""
    """Sandblaster's workers: the coordinator's address."""
    stage: int = 0
    """Stages: the partition this process runs."""
    next_stage: str = ""
    """Stages but the last: the address of the replica's next stage."""

    @property
    def name(self) -> str:
        """``shard0``, ``worker1``, ``worker1.stage0``, ``evaluator``, ``coordinator``: the
        name in events, pids.json and faults."""
        if self.kind in (ProcessKind.EVALUATOR, ProcessKind.COORDINATOR):
            return self.kind.value
        if self.kind is ProcessKind.STAGE:
            return f"{replica_name(self.index)}.stage{self.stage}"
        return f"{self.kind.value}{self.index}"


def shard_names(num_shards: int) -> set[str]:
    """The names of a job's ``num_shards`` shards in events, pids.json and faults."""
    return {ProcessSpec(ProcessKind.SHARD, shard_id).name for shard_id in range(num_shards)}


def replica_name(rank: int) -> str:
    """How a replica is named in faults (its stages are ``worker{rank}.stage{s}``)."""
    return f"worker{rank}"


EXIT_PEER_LOST = 75
"""A stage's exit code when a neighbouring stage of its replica went away: a death of the
replica (restarted as a whole), not an error of this stage."""
NEIGHBOUR_LOST = "neighbour_lost"
"""The event a stage sends, with its ``error``, before it exits with ``EXIT_PEER_LOST``."""


class Event(NamedTuple):
    """What a process reported: "ready", "heartbeat", "started", "metric", "evaluated" (the
    evaluator's whole evaluation, after its "metric" row), "done", "error", "rolled_back"
    (Sandblaster's coordinator went back to a checkpoint)."""

    kind: str
    source: ProcessSpec
    """The process that reported it."""
    payload: Any


@dataclass
class Fault:
    """A process that died without reporting an error, or reported one while the job stopped,
    and what the cluster did about it."""

    process: str
    time_s: float
    """Seconds since training started (the time axis of metrics.csv)."""
    exitcode: int | None
    """The process's exit code (-N: ended by signal N); None where it is not known (a Ray
    actor's process that went with its actor: ``cause`` says what Ray told)."""
    action: str
    """"restarted" or "given up"."""
    version_before: int | None = None
    """Shards: the most any process saw the shard apply before it died: its heartbeats, the
    workers' metrics and, reported to its next life, each worker's last reply from it."""
    version_restored: int | None = None
    """Shards: the version its checkpoint restored."""
    updates_replayed: int | None = None
    """Shards: updates the workers re-sent to the restarted shard from their replay buffers
    (what its checkpoint lacked), as the shard counted them."""
    pushes_resent: int | None = None
    """Shards: pushes in flight at the death, re-applied by the workers' retries."""
    rolled_back: bool = False
    """A Sandblaster job's shards and coordinator: the whole job went back to the last
    checkpoint and does the iterations since it again, so what the dead process had done is
    redone, not lost."""
    updates_redone: int | None = None
    """Rolled back: the iterations (each one update of the parameters) the job had finished
    since the checkpoint it went back to, and so did again."""
    resumed_at_step: int | None = None
    """Workers and replicas restarted: the step the next life went on from, the last push of
    the dead one that every shard had applied (the shards hold its updates up to that step, and
    none of the steps after it, which the next life does again)."""
    while_stopping: bool = False
    """It died while the job stopped (Ctrl-C, a failure, or training over and the shards
    asked to stop): it was not restarted, as nothing was left for it to do."""
    last_checkpoint_saved: bool | None = None
    """A shard that died while the job stopped: whether it had returned its result, and so
    saved the checkpoint it saves on the way out (False: a resume restores its one before).
    A Sandblaster job's shards save only when the coordinator commits an iteration: whether
    the last one committed (summary.json's ``coordinator.resumes_from_iteration``) is the last
    iteration the job reached, known once the job has stopped. None otherwise."""
    error: str | None = None
    """A process that reported an error while the job stopped (a shard that could not save
    its last checkpoint, say): its exception line. The job, ending already, was not failed by
    it: it is given up, as a death then is. None for a death."""
    cause: str | None = None
    """How the process ended when its exit code is not known: Ray's own words on its actor's
    end (``ray_endings``); or why a stage exited with ``EXIT_PEER_LOST`` (the error that told
    it its neighbour was gone). None where the exit code says it, or nothing was told."""
    recovery_cut_short: bool = False
    """Shards: the life restarted after this death died too, before it returned its result:
    ``updates_replayed`` and ``pushes_resent`` are its last heartbeat's (or none), so the
    workers' replays after that heartbeat went uncounted."""

    @property
    def redone(self) -> int | None:
        """Rolled back: the updates done again, ``updates_redone`` as the coordinator counted
        them or, where it did not say (it had finished, or failed), what the shard's versions
        tell: those it had applied past the checkpoint it restored. None otherwise."""
        if not self.rolled_back:
            return None
        if self.updates_redone is not None or self.version_restored is None:
            return self.updates_redone
        return max(0, (self.version_before or 0) - self.version_restored)

    @property
    def lost_updates(self) -> int | None:
        """Updates the dead shard had applied that neither its checkpoint nor the workers'
        replays and retries brought back (``version_before`` is the most any process saw);
        0 when the job rolled back to the checkpoint. None when unknown: the shard never
        restored, or its next life died before it counted replays that would cover them."""
        if self.rolled_back and self.updates_redone is not None:
            return 0
        if self.version_before is None or self.version_restored is None:
            return None
        if self.rolled_back:
            return 0
        recovered = (self.updates_replayed or 0) + (self.pushes_resent or 0)
        lost = max(0, self.version_before - self.version_restored - recovered)
        # Replays only add up: a shortfall in a count cut short may be replays never reported
        # (the workers re-send them to the next life, whose own fault counts them).
        return None if lost and self.recovery_cut_short else lost


class Cluster(Protocol):
    """Runs one job's processes. Use as a context manager: leaving it stops every process.

    A process that dies without reporting an error is restarted by ``RESTART_POLICIES`` of its
    kind, up to ``config.faults.max_restarts`` times; a process that reports an error fails the job.
    """

    security: WireSecurity
    """The job's wire security: every process, and whoever polls the shards, uses it."""
    faults: list[Fault]
    on_fault: Callable[[Fault], None] | None
    """Called with each Fault as it happens (the launcher shows it)."""
    on_ready: Callable[[Event], None] | None
    """Called with each "ready" event as the cluster takes it in, a restarted process's too,
    also while it waits for readiness (the launcher tells a restarted shard what the shards
    were told before its restart)."""

    def __init__(self, config: JobConfig, run_dir: Path) -> None:
        """Gets ready to run ``config``'s job; its files (pids, logs) go into ``run_dir``."""

    @classmethod
    def warm_up(cls, config: JobConfig) -> None:
        """Starts, in the background, what starting processes will need (called first, before
        the run folder exists, so that it overlaps the launcher's own work)."""

    def start(self, kind: ProcessKind, index: int, stage: int = 0) -> None:
        """Starts one process; shards must be ready (see ``wait_for_shards``) before workers,
        the evaluator and the coordinator start, and in a Sandblaster job the coordinator (see
        ``wait_for_coordinator``) before the workers. A replica's stages start last to first,
        each once the next one listens (see ``wait_for_stage``). A process of a kind asked to
        stop starts asked (the evaluator evaluates once and returns); one that returned may be
        started again, and its new life's result replaces the one before."""

    def wait_for_stage(self, rank: int, stage: int, timeout_s: float) -> str:
        """Waits until stage ``stage`` of replica ``rank`` listens; returns its address.

        Raises:
            ChildFailedError: it failed, or was not ready within ``timeout_s``.
        """

    def wait_for_shards(self, timeout_s: float) -> list[str]:
        """Waits until every started shard listens; returns their addresses in shard-id order.

        Raises:
            ChildFailedError: a shard failed, or they were not all ready within ``timeout_s``.
        """

    def wait_for_coordinator(self, timeout_s: float) -> str:
        """Waits until the started coordinator listens; returns its address.

        Raises:
            ChildFailedError: it failed, or was not ready within ``timeout_s``.
        """

    def next_event(self, timeout_s: float) -> Event | None:
        """The next event of any process, waiting up to ``timeout_s``; restarts processes that
        died (see the class).

        Raises:
            ChildFailedError: a process reported an error or cannot be brought back.
        """

    def finished(self, kind: ProcessKind) -> bool:
        """Whether every process of ``kind`` has exited cleanly (or been given up on)."""

    def exited(self, kind: ProcessKind) -> bool:
        """Whether no process of ``kind`` is still running, however it ended."""

    def begin_stop(self) -> None:
        """The job ends early (Ctrl-C, a failure): from now on a process that dies is given up,
        not restarted, as nothing is left for it to do (asking the shards to stop does the
        same at a job's end), and one that reports an error is a fault (``Fault.error``), not
        raised: the job ends as it was ending."""

    def stop(self, kind: ProcessKind) -> None:
        """Asks every process of ``kind`` to finish, at once: the evaluator evaluates one last
        time, shards write a last checkpoint and report their counters, Sandblaster's workers
        stop waiting for a coordinator that has finished."""

    def results(self, kind: ProcessKind) -> dict[int, Any]:
        """What each finished process of ``kind`` returned, by index."""

    def stop_all(self) -> None:
        """Stops every process (workers and evaluator first, then shards), within seconds; a
        process that dies meanwhile, by another hand than the cluster's, or reports an error
        not raised yet, is a fault too (``while_stopping``)."""

    def __enter__(self) -> Cluster: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def cluster_methods_lacking(cls: type) -> list[str]:
    """The methods of ``Cluster`` that the class ``cls`` does not have (none for a cluster:
    ``Cluster`` is a protocol, which ``issubclass`` cannot check)."""
    wanted = [
        name
        for name, value in vars(Cluster).items()
        if (callable(value) or isinstance(value, classmethod))
        and (not name.startswith("_") or name in ("__enter__", "__exit__"))
    ]
    return [name for name in wanted if not callable(getattr(cls, name, None))]


class ProcessBook:
    """What any Cluster knows about its job's processes, whatever runs them: the shards'
    addresses, the step each worker reached and each shard's version (from their events),
    restarts, give-ups and faults, and the restart decision by kind.

    Args:
        config: the job (``num_workers``, ``num_shards``, ``max_restarts``, ``host``).
    """

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.addresses: dict[int, str] = {}
        """Shard id -> address, from their "ready" events."""
        self.coordinator_address: str | None = None
        self.stage_addresses: dict[tuple[int, int], str] = {}
        """(replica rank, stage) -> address, from the stages' "ready" events."""
        self.pushed_steps: dict[tuple[int, int], int] = {}
        """(worker rank, stage) -> the step of its last push every shard applied (whole-model
        workers are stage 0)."""
        self.shard_versions: dict[int, int] = {}
        self.restarts: dict[str, int] = {}
        self.given_up: set[str] = set()
        self.faults: list[Fault] = []
        self.coordinator_iteration: int | None = None
        """The last iteration Sandblaster's coordinator reported finished."""
        self.train_start: float | None = None
        """Wall time the first worker started training (metrics count time from there)."""
        self.stopping = False
        """The job is stopping (Ctrl-C, a failure, or the shards asked to stop at its end):
        a process that dies now is given up, not restarted."""
        self.returned: set[str] = set()
        """The processes that returned their result ("done")."""
        self.neighbours_lost: dict[str, str] = {}
        """Stage -> the error that told it a neighbouring stage of its replica was gone (it
        then exits with ``EXIT_PEER_LOST``): the cause its fault names."""

    def spec(self, kind: ProcessKind, index: int, stage: int = 0) -> ProcessSpec:
        """Where process ``kind``/``index`` starts: a shard on its old address once it has one,
        a worker at its last push the shards applied, a stage on its old address (and its
        replica's next stage's) at its replica's last push the shards applied (the least of
        its stages').

        Raises:
            ValueError: ``kind`` is no ProcessKind, or ``index`` or ``stage`` is not one of
                the job's (a shard id past ``num_shards``, say: it would start, then fail).
        """
        self._check_process(kind, index, stage)
        host = f"tcp://{self.config.cluster.host}:0"
        if kind is ProcessKind.STAGE:
            # A stage is a worker: it listens (for the stage before) on the workers' host.
            host = f"tcp://{self.config.cluster.worker_host or self.config.cluster.host}:0"
            return ProcessSpec(
                kind,
                index,
                bind=self.stage_addresses.get((index, stage), host),
                resume_step=self.resume_step(index),
                restarted=self.restarts.get(replica_name(index), 0) > 0,
                stage=stage,
                next_stage=self.stage_addresses.get((index, stage + 1), ""),
            )
        if kind is ProcessKind.SHARD:
            bind = f"tcp://{self.config.cluster.shard_host(index)}:0"
            return ProcessSpec(kind, index, bind=self.addresses.get(index, bind))
        if kind is ProcessKind.WORKER:
            return ProcessSpec(
                kind,
                index,
                resume_step=self.resume_step(index),
                restarted=self.restarts.get(self.restart_unit(ProcessSpec(kind, index)), 0) > 0,
                coordinator=self.coordinator_address or "",
            )
        if kind is ProcessKind.COORDINATOR:
            host = f"tcp://{self.config.cluster.host}:0"
            return ProcessSpec(kind, index, bind=self.coordinator_address or host)
        return ProcessSpec(kind, index)

    def resume_step(self, rank: int) -> int:
        """Where worker (or replica) ``rank`` goes on: its last push every shard applied; a
        replica's stages step together, so the least of its stages'."""
        stages = range(self.config.pipeline.num_partitions)  # 1 for a whole-model worker
        return min(self.pushed_steps.get((rank, stage), 0) for stage in stages)

    def _check_process(self, kind: object, index: object, stage: object) -> None:
        """Refuses a process the job does not have (see ``spec``)."""
        if not isinstance(kind, ProcessKind):
            raise ValueError(f"kind must be a ProcessKind, got {kind!r}")
        cluster = self.config.cluster
        counts = {
            ProcessKind.SHARD: ("num_shards", cluster.num_shards),
            ProcessKind.WORKER: ("num_workers", cluster.num_workers),
            ProcessKind.STAGE: ("num_workers", cluster.num_workers),
            ProcessKind.EVALUATOR: ("one", 1),
            ProcessKind.COORDINATOR: ("one", 1),
        }
        name, count = counts[kind]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(
                f"{kind.value} index must be an integer in [0, {count}) ({name} of the job), "
                f"got {index!r}"
            )
        partitions = self.config.pipeline.num_partitions if kind is ProcessKind.STAGE else 1
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < partitions:
            raise ValueError(
                f"{kind.value} {index}: stage must be an integer in [0, {partitions}) "
                f"(the job's partitions), got {stage!r}"
            )

    def note(self, event: Event) -> None:
        """Takes in one event of a process: readiness, training start, steps and versions."""
        kind, source, payload = event
        if kind == "started" and self.train_start is None:
            self.train_start = payload["time"]
        if kind in ("started", "pushed") and "step" in payload:
            # A life starts after its last push the shards applied: one of the pushes too.
            self.pushed_steps[(payload["rank"], payload.get("stage", 0))] = payload["step"]
            if kind == "started":
                self._note_resumed(self.restart_unit(source), payload["step"])
        elif kind == "heartbeat":
            self.shard_versions[payload["shard_id"]] = payload["version"]
            self._note_recovery(source.name, payload)
        elif kind == "done" and source.kind is ProcessKind.SHARD:
            self.returned.add(source.name)
            self._note_recovery(source.name, payload)
        elif kind == "metric" and payload.get("role") == "worker":
            # Every shard applies every push, so a worker's view bounds each shard's version.
            for shard_id in range(self.config.cluster.num_shards):
                seen = max(self.shard_versions.get(shard_id, 0), payload.get("version") or 0)
                self.shard_versions[shard_id] = seen
        elif kind == "metric" and payload.get("role") == "coordinator":
            if self.coordinator_iteration is None:
                # The launch's first report: a coordinator (or shard) that died before it, the
                # job having finished no iteration, left nothing to redo (a coordinator that
                # finds no checkpoint starts afresh, without a "rolled_back").
                self._note_rollback(payload["step"], payload["step"])
            self.coordinator_iteration = payload["step"]
        elif kind == "rolled_back":
            self._note_rollback(payload["from_iteration"], payload["to_iteration"])
        elif kind == NEIGHBOUR_LOST:
            self.neighbours_lost[source.name] = payload["error"]
        elif kind == "ready" and source.kind is ProcessKind.COORDINATOR:
            self.coordinator_address = payload["address"]
        elif kind == "ready" and source.kind is ProcessKind.STAGE:
            if payload.get("address"):
                self.stage_addresses[(source.index, source.stage)] = payload["address"]
        elif kind == "ready":
            self.addresses[source.index] = payload["address"]
            if source.kind is ProcessKind.SHARD:
                restored = payload.get("restored_version")
                self._note_restored(source.name, source.index, restored)

    def _note_rollback(self, done: int | None, to_iteration: int) -> None:
        """Sandblaster's coordinator went back from iteration ``done`` (None: a restarted
        coordinator, which knows not where its previous life got to; its reports do) to the
        checkpoint of ``to_iteration``: what that redoes goes to the faults that caused it (two
        shards lost together: each), once per process (a restarted coordinator killed again
        before it told its rollback redid nothing more)."""
        if done is None:
            done = self.coordinator_iteration
        if done is None:
            done = to_iteration  # no report yet in this launch: no iteration past it finished
        redone, counted = max(0, done - to_iteration), set()
        for fault in self.faults:
            if fault.rolled_back and fault.updates_redone is None:
                fault.updates_redone = 0 if fault.process in counted else redone
                counted.add(fault.process)
        self.coordinator_iteration = to_iteration

    def _note_resumed(self, unit: str, step: int) -> None:
        """The restarted life of ``unit`` (a worker, or a replica's stage) went on from
        ``step``: later than the launcher knew where the shards had taken a push in flight at
        the death."""
        for fault in reversed(self.faults):
            if fault.process.split(".")[0] == unit:
                if fault.resumed_at_step is not None:
                    fault.resumed_at_step = step
                return

    def _note_restored(self, name: str, shard_id: int, version: int | None) -> None:
        """Shard ``name``'s restarted life restored ``version`` (None: it found no checkpoint,
        so its last life had never been given the model, a shard saving before it answers its
        INIT, and had applied nothing: it is as at version 0)."""
        for fault in reversed(self.faults):
            if fault.process == name and fault.version_restored is None:
                if version is None:
                    version = fault.version_before = 0
                fault.version_restored = version
                self.shard_versions[shard_id] = version
                return

    def _note_recovery(self, name: str, figures: dict) -> None:
        """A restarted shard's count of what its workers re-sent (``ShardGroups.recovery``)
        goes to its latest fault, and what they saw of its previous life to the version
        before."""
        if "updates_replayed" not in figures:
            return
        for fault in reversed(self.faults):
            if fault.process == name:
                if fault.version_restored is None:
                    return  # this life restored nothing: it has nothing to report
                fault.updates_replayed = figures["updates_replayed"]
                fault.pushes_resent = figures["pushes_resent"]
                seen = figures["version_seen_before"]
                before = fault.version_before
                fault.version_before = seen if before is None else max(before, seen)
                return

    def record_death(
        self,
        spec: ProcessSpec,
        exitcode: int | None,
        *,
        stopping: bool,
        cause: str | None = None,
        restartable: bool = True,
    ) -> Fault:
        """Records that ``spec``'s process died without an error (``cause``: how, where its
        exit code is not known) and decides, by its kind, whether it is restarted (``action``
        "restarted": the caller starts ``self.spec(...)``; for a stage, every stage of its
        replica) or given up. No restarts once the job is ``stopping``, nor where the cluster
        cannot bring it back (not ``restartable``). A stage's restarts count for its whole
        replica."""
        unit = self.restart_unit(spec)
        restarts = self.restarts.get(unit, 0)
        can_restart = restarts < self.config.faults.max_restarts and not stopping and restartable
        lost = self.neighbours_lost.pop(spec.name, None)
        if cause is None and exitcode == EXIT_PEER_LOST and lost is not None:
            # It did nothing wrong: the stage it waited for is the one to look at.
            cause = f"a neighbouring stage of its replica was lost: {lost}"
        fault = Fault(
            spec.name,
            # On metrics.csv's clock, which starts as the first worker does: a death before
            # that is at its start (it counted from the launch, ahead of the first rows).
            0.0 if self.train_start is None else time.time() - self.train_start,
            exitcode,
            "restarted" if can_restart else "given up",
            cause=cause,
        )
        # A Sandblaster job goes back to its last checkpoint only for a process that comes
        # back: one given up (out of restarts, or the job stopping) ends the job instead.
        sandblaster = self.config.optimizer.algorithm == "sandblaster"  # workers take portions
        rolls_back = sandblaster and can_restart
        fault.while_stopping = stopping
        if spec.kind is ProcessKind.SHARD:
            self._note_life_cut_short(spec.name)
            fault.version_before = self.shard_versions.get(spec.index)
            fault.rolled_back = rolls_back
            if stopping and not sandblaster:
                fault.last_checkpoint_saved = spec.name in self.returned
        elif spec.kind is ProcessKind.COORDINATOR:
            fault.rolled_back = rolls_back
        elif (
            spec.kind in (ProcessKind.WORKER, ProcessKind.STAGE) and can_restart and not sandblaster
        ):
            fault.resumed_at_step = self.resume_step(spec.index)
        self.faults.append(fault)
        if can_restart:
            self.restarts[unit] = restarts + 1
        else:
            self.given_up.add(unit)
        return fault

    def record_error(self, spec: ProcessSpec, exitcode: int | None, detail: str) -> Fault:
        """Records that ``spec``'s process reported an error (``detail``, its traceback) while
        the job stopped: a fault with its exception line, given up as a death then is."""
        fault = self.record_death(spec, exitcode, stopping=True)
        fault.error = ChildFailedError(spec.name, exitcode, detail).error() or None
        return fault

    def _note_life_cut_short(self, name: str) -> None:
        """Shard ``name`` died: if this life was a restart that restored a checkpoint, the
        recovery it reported for its previous death stops at its last heartbeat."""
        for fault in reversed(self.faults):
            if fault.process == name:
                fault.recovery_cut_short = fault.version_restored is not None
                return

    @staticmethod
    def restart_unit(spec: ProcessSpec) -> str:
        """What restarts together with ``spec``'s process: itself, or (a stage) its replica."""
        if RESTART_POLICIES[spec.kind].restarts_replica:
            return replica_name(spec.index)
        return spec.name

    def raise_if_fatal(self, spec: ProcessSpec, fault: Fault) -> None:
        """Fails the job when ``fault`` gave up a process whose kind cannot do without it.

        Raises:
            ChildFailedError: a shard or the evaluator was given up, or every worker was.
        """
        if fault.action != "given up":
            return
        if RESTART_POLICIES[spec.kind].fatal_when_exhausted:
            raise ChildFailedError(spec.name, fault.exitcode, "died and was not restarted")
        indices = range(self.num_processes(spec.kind))
        if spec.kind is ProcessKind.STAGE:
            indices = range(self.config.cluster.num_workers)
        if all(self.restart_unit(ProcessSpec(spec.kind, i)) in self.given_up for i in indices):
            raise ChildFailedError(
                f"every {spec.kind.value}", fault.exitcode, f"all {spec.kind.value}s died"
            )

    def num_processes(self, kind: ProcessKind) -> int:
        """How many processes of ``kind`` the job has."""
        if kind is ProcessKind.SHARD:
            return self.config.cluster.num_shards
        if kind is ProcessKind.WORKER:
            return self.config.cluster.num_workers
        if kind is ProcessKind.STAGE:
            return self.config.cluster.num_workers * self.config.pipeline.num_partitions
        return 1
