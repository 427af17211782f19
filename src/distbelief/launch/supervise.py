"""Supervising a running job: routing its processes' events to one sink (``EventRouter``),
waiting for the training processes and stopping the rest in order, and what the processes
returned or last reported (``job_result``). It never starts a process or writes the run
folder's records: ``job.py`` does.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

from distbelief.config import JobConfig
from distbelief.deferred_signals import signals_deferred
from distbelief.errors import DistBeliefError
from distbelief.launch.cluster import (
    STOP_GRACE_S,
    Cluster,
    Event,
    ProcessKind,
    ProcessSpec,
    shard_names,
)
from distbelief.launch.stop_records import on_metrics_clock
from distbelief.launch.summary import RunResult
from distbelief.telemetry.metrics import EVALUATED, EVALUATION_FIELDS

if TYPE_CHECKING:
    from distbelief.telemetry import ShardStatsPoller, Sink

STOP_NOTICE_S = 60.0
"""A finished job's evaluator or shards (or Sandblaster's workers, once the coordinator has
finished) not exited this long after being asked to stop (a process stopped or stuck) are
waited on still, and the launcher says so once."""


class EventRouter:
    """Turns process events into records and messages for one sink; times count from the first
    worker's start (children report wall-clock times; process start-up is not training time).
    ``poll_shards`` adds the shards' counters as ``shard`` records. It keeps the last step each
    worker reported (a Sandblaster worker's: its portions committed so far), the last
    evaluation and each shard's last report (its heartbeat, then its result): what a job that
    ends early knows of them."""

    def __init__(self, sink: Sink, shard_poller: ShardStatsPoller | None = None) -> None:
        self.sink = sink
        self.shard_poller = shard_poller
        self.train_start: float | None = None
        self.steps_reported: dict[int, int] = {}
        self.pushed_steps: dict[tuple[int, int], int] = {}
        """(rank, stage) -> the last step of its pushes every shard applied (a life's start
        tells one too): a worker got at least that far, though its rows (every few steps)
        may have told less before it was given up (``steps_reached``)."""
        self.portions_before_life: dict[int, int] = {}
        """Sandblaster: per rank, the portions committed before its current life started (a
        restarted worker counts its portions from 0 again)."""
        self._portion_lives: set[int] = set()
        """Sandblaster: the ranks a worker's life has started for."""
        self.last_evaluation: dict = {}
        self.coordinator_rows: dict[int, dict] = {}
        """Sandblaster: the coordinator's last row of each iteration (a redone one's replaces
        it), for a run that ends before the coordinator returned its result."""
        self.shard_reports: dict[int, dict] = {}
        """Shard id -> its latest heartbeat or, once it returned, its result: the counters,
        staleness histogram and workers' hosts so far (its current life's, after a restart)."""

    def steps_reached(self, num_stages: int) -> dict[int, int]:
        """Per rank, the step its rows told, or the step of its pushes every shard applied
        where that is later (of a partitioned replica, the least of its stages')."""
        reached = dict(self.steps_reported)
        for rank in {rank for rank, _ in self.pushed_steps}:
            pushed = [self.pushed_steps.get((rank, stage)) for stage in range(num_stages)]
            if None not in pushed:
                reached[rank] = max(reached.get(rank, 0), min(pushed))  # type: ignore[type-var]
        return reached

    def steps_in_all_lives(self, rank: int, result: dict) -> int:
        """The steps of worker ``rank``'s ``result``: a Downpour worker's next life counts on
        from the last; a Sandblaster worker's counts its portions from 0 again, to which those
        its earlier lives committed are added (at least those its rows committed in all)."""
        if "portions" not in result:
            return result["steps"]
        steps = self.portions_before_life.get(rank, 0) + result["steps"]
        return max(steps, self.steps_reported.get(rank, 0))

    def poll_shards(self, *, now: bool = False) -> None:
        """Routes the shards' counters if a poll is due (cheap to call in any loop), or
        ``now``: once training is over, so the last progress line has the shards' versions."""
        if self.shard_poller is not None:
            for record in self.shard_poller.poll_if_due(now=now):
                self._write(record)

    def __call__(self, event: Event | None) -> None:
        if event is None:
            return
        kind, source, payload = event
        if kind == "started" and self.train_start is None:
            self.train_start = payload["time"]
        elif kind == "metric":
            self._write(payload)
        elif kind == EVALUATED:
            self.last_evaluation = {
                key: payload[key] for key in EVALUATION_FIELDS if payload.get(key) is not None
            }
        elif kind in ("heartbeat", "done") and source.kind is ProcessKind.SHARD:
            self.shard_reports[source.index] = payload
        elif kind == "done" and source.kind in (ProcessKind.WORKER, ProcessKind.STAGE):
            # A Sandblaster worker's steps are the portions it computed.
            unit = "portions" if "portions" in payload else "steps"
            steps = self.steps_in_all_lives(source.index, payload)
            self.sink.message(f"{source.name} finished after {steps} {unit}")
        # A Sandblaster worker's life starts (a Downpour worker's tells the step it goes on from).
        if kind == "started" and "step" not in payload and _is_worker(source):
            if source.index in self._portion_lives:
                self.portions_before_life[source.index] = self.steps_reported.get(source.index, 0)
            self._portion_lives.add(source.index)
        if kind in ("started", "pushed") and "step" in payload:
            key = (payload["rank"], payload.get("stage", 0))
            self.pushed_steps[key] = max(self.pushed_steps.get(key, 0), payload["step"])

    def now_s(self) -> float | None:
        """Now on the records' clock (seconds since the first worker started), for a message
        said long after the last record (a stop that takes a minute); None before any start."""
        return None if self.train_start is None else max(0.0, time.time() - self.train_start)

    def coordinator_so_far(self) -> dict:
        """What the coordinator's rows tell of a Sandblaster run that ended before it returned
        (summary.json's ``coordinator``, ``stop_reason`` "stopped"): its last iteration, and
        the evaluations made, where this launch saw them all from iteration 0 (a resumed run's
        earlier ones are in the checkpoint only: null)."""
        if not self.coordinator_rows:
            return {"stop_reason": "stopped"}  # before its first iteration ended
        last_step = max(self.coordinator_rows)
        rows = [self.coordinator_rows[step] for step in sorted(self.coordinator_rows)]
        seen_all = set(self.coordinator_rows) >= set(range(last_step + 1))
        last = rows[-1]
        keys = (
            "loss",
            "grad_norm",
            "step_size",
            "evaluations",
            "portions",
            "backups",
            "backups_won",
        )
        return {
            "iterations": last_step,
            "loss": last.get("loss"),
            "stop_reason": "stopped",
            "evaluations": (sum(row.get("evaluations") or 0 for row in rows) if seen_all else None),
            "last_iteration": {"step": last_step, **{k: last.get(k) for k in keys}},
        }

    def _write(self, record: dict) -> None:
        if record["role"] == "worker" and record.get("portions") is not None:
            # A Sandblaster worker's row (the coordinator's) has the iteration as its step:
            # its count is the portions, each row those committed in one iteration.
            rank = record["rank"]
            self.steps_reported[rank] = self.steps_reported.get(rank, 0) + record["portions"]
        elif record["role"] == "worker" and record.get("step") is not None:
            self.steps_reported[record["rank"]] = record["step"]
        elif record["role"] == "coordinator" and record.get("step") is not None:
            self.coordinator_rows[record["step"]] = record
        start = self.train_start if self.train_start is not None else record["time_s"]
        self.sink.write({**record, "time_s": max(0.0, record["time_s"] - start)})


def _is_worker(source: ProcessSpec | None) -> bool:
    return source is not None and source.kind is ProcessKind.WORKER


def supervise(cluster: Cluster, route: EventRouter, config: JobConfig) -> None:
    """Route events until the workers finish (Sandblaster: the coordinator, which tells the
    workers it reaches to stop, then the workers, told to stop by their flag too: one that
    reached the coordinator too late, still starting, say, must not wait for it), then stop
    the evaluator (after its final evaluation, made again if a shard restarted meanwhile:
    ``_evaluate_again_after_shard_restarts``) and the shards (which report their counters),
    in that order."""
    training = [training_kind(config)]
    stopped = [ProcessKind.EVALUATOR, ProcessKind.SHARD]
    if config.optimizer.algorithm == "sandblaster":
        training.insert(0, ProcessKind.COORDINATOR)
        stopped.append(ProcessKind.WORKER)
    for kind in (*training, ProcessKind.EVALUATOR, ProcessKind.SHARD):
        faults_before = len(cluster.faults)
        if kind in stopped:
            cluster.stop(kind)
        _route_until_finished(
            cluster, route, kind, training=kind in training, asked=kind in stopped
        )
        if kind is ProcessKind.EVALUATOR:
            _evaluate_again_after_shard_restarts(cluster, route, config, faults_before)
        if kind == training[-1]:
            route.poll_shards(now=True)
    while (event := cluster.next_event(0.05)) is not None:
        route(event)


def _route_until_finished(
    cluster: Cluster, route: EventRouter, kind: ProcessKind, *, training: bool, asked: bool
) -> None:
    """Routes events until every process of ``kind`` has finished; polls the shards while
    ``training``; says once that processes ``asked`` to stop are slow to (Sandblaster's
    workers, told to stop once the coordinator has finished, poll still)."""
    asked_at, said = time.monotonic(), False
    while not cluster.finished(kind):
        route(cluster.next_event(0.2))
        if training:
            route.poll_shards()
        if asked and not said and time.monotonic() - asked_at >= STOP_NOTICE_S:
            # A process that hangs (stopped, stuck on its disk) would hold the launcher
            # without a word: it waits on (a shard saves its last checkpoint), and says so.
            said = True
            route.sink.message(_still_stopping(kind, time.monotonic() - asked_at), route.now_s())


def _evaluate_again_after_shard_restarts(
    cluster: Cluster, route: EventRouter, config: JobConfig, faults_seen: int
) -> None:
    """The evaluator's last evaluation is summary.json's ``final``. A shard restarted since
    the evaluator was asked for it (the faults after ``faults_seen``) came back from its last
    checkpoint with no worker left to replay what it lost: that evaluation may describe
    parameters the run no longer holds. The evaluator is started again (its stop flag set, it
    evaluates the shards once and returns), until no shard restarted during its evaluation:
    ``final`` is then what the shards save as they stop, what a resume or ``eval`` sees."""
    shards = shard_names(config.cluster.num_shards)
    while any(
        fault.process in shards and fault.action == "restarted"
        for fault in cluster.faults[faults_seen:]
    ):
        faults_seen = len(cluster.faults)
        cluster.start(ProcessKind.EVALUATOR, 0)
        _route_until_finished(cluster, route, ProcessKind.EVALUATOR, training=False, asked=True)


def _still_stopping(kind: ProcessKind, waited_s: float) -> str:
    """The line said once when the processes of ``kind`` have not exited ``STOP_NOTICE_S``
    after the finished job asked them to."""
    if kind is ProcessKind.SHARD:
        return (
            f"the shards have not all exited {waited_s:.0f}s after the job asked them to stop "
            "(each saves its last checkpoint first); still waiting: Ctrl-C ends them"
        )
    if kind is ProcessKind.WORKER:
        return (
            f"the workers have not all exited {waited_s:.0f}s after the job asked them to stop; "
            "still waiting: Ctrl-C ends them"
        )
    return (
        f"the {kind.value} has not exited {waited_s:.0f}s after the job asked it to stop; still "
        "waiting: Ctrl-C ends it"
    )


def stop_coordinator(cluster: Cluster, route: EventRouter, config: JobConfig) -> None:
    """Sandblaster, a job ending early (Ctrl-C, a failure): asks the coordinator to stop, and
    routes what it reports until it has returned (its result read, not only its exit seen:
    its last rows and its result may still be on their way then), up to the job's request
    timeout (an iteration's evaluation waits no longer; ``STOP_GRACE_S`` at least): the
    iteration under way, whose checkpoint it commits, then has its row in metrics.csv and is
    summary.json's ``coordinator``, as the cluster's stop, which comes after, would leave them
    unread. A process failing, or a run folder that cannot take its rows meanwhile, ends the
    wait; the cluster stops the rest. A second Ctrl-C (or SIGTERM, SIGHUP) cuts it to
    ``STOP_GRACE_S``, which the cluster's stop would give the coordinator anyway: its rows are
    still read meanwhile (cut off, the iteration it commits would have no row, and a resumed
    run would go on after it)."""
    if config.optimizer.algorithm != "sandblaster" or cluster.results(ProcessKind.COORDINATOR):
        return
    if not cluster.finished(ProcessKind.COORDINATOR):
        cluster.stop(ProcessKind.COORDINATOR)
    wait_s = max(STOP_GRACE_S, config.faults.timeout_s)
    asked_at = time.monotonic()
    deadline, said = asked_at + wait_s, False
    exited_at: float | None = None
    hurried = ending = False
    with (
        signals_deferred(raise_noted=False) as noted,
        contextlib.suppress(DistBeliefError, OSError),
    ):
        while not cluster.results(ProcessKind.COORDINATOR) and time.monotonic() < deadline:
            if noted and not hurried:
                hurried = True
                deadline = min(deadline, time.monotonic() + STOP_GRACE_S)
            if exited_at is None and cluster.exited(ProcessKind.COORDINATOR):
                # Exited, however (one that failed returns nothing): what it sent is read next.
                exited_at = time.monotonic()
                deadline = max(deadline, exited_at + _EXITED_EVENTS_S)
            if exited_at is not None and time.monotonic() - exited_at > _EXITED_EVENTS_S:
                return
            looked = ending or exited_at is not None
            why = None if looked else _why_the_iteration_cannot_end(cluster, config)
            if why is not None:
                # Waiting would only wait out the coordinator's timeout: what it sent is read,
                # then the cluster's stop ends it (its last committed checkpoint is where a
                # resume goes on).
                ending = said = True
                deadline = min(deadline, time.monotonic() + _EXITED_EVENTS_S)
                route.sink.message(
                    f"the coordinator's iteration under way cannot end: {why}", route.now_s()
                )
            if not (said or hurried) and time.monotonic() - asked_at >= STOP_GRACE_S:
                said = True  # a worker or shard that hangs holds it up to the request timeout
                route.sink.message(
                    "the coordinator is ending its iteration under way, to commit it: waiting "
                    f"up to {wait_s:g}s in all (--timeout); Ctrl-C again cuts it short",
                    route.now_s(),
                )
            route(cluster.next_event(0.2))


def _why_the_iteration_cannot_end(cluster: Cluster, config: JobConfig) -> str | None:
    """Why Sandblaster's iteration under way cannot end (no worker runs to compute its
    portions; a shard given up held vectors it needs), or None where it may."""
    kind = training_kind(config)
    # A worker that returned was told to stop by the coordinator, done with its iterations.
    if cluster.exited(kind) and not cluster.results(kind):
        return "no worker is left to compute its portions"
    shards = shard_names(config.cluster.num_shards)
    lost = [f.process for f in cluster.faults if f.process in shards and f.action == "given up"]
    return None if not lost else f"{lost[0]} was given up"


_EXITED_EVENTS_S = 2.0
"""How long the events of a process seen exited are read for: sent before it exited, they are
in its pipe already (a given-up process sends none)."""


def training_kind(config: JobConfig) -> ProcessKind:
    """Whole-model workers, or the stages of partitioned replicas."""
    return ProcessKind.STAGE if config.pipeline.num_partitions > 1 else ProcessKind.WORKER


def _coordinator(cluster: Cluster, route: EventRouter, config: JobConfig) -> dict:
    """summary.json's ``coordinator``: a Sandblaster run's coordinator's result, or what its
    rows told; none for a Downpour run."""
    if config.optimizer.algorithm != "sandblaster":
        return {}
    return cluster.results(ProcessKind.COORDINATOR).get(0) or route.coordinator_so_far()


def job_result(
    cluster: Cluster,
    config: JobConfig,
    run_dir: Path,
    elapsed_s: float,
    route: EventRouter,
    addresses: list[str],
    *,
    time_offset_s: float = 0.0,
) -> RunResult:
    """What the processes returned; for those that have not (the job ended early), what they
    reported last: a worker's step, the last evaluation, a shard's address. A shard's
    staleness and workers' hosts are always its last report (``EventRouter.shard_reports``):
    its result when it returned one, else its last heartbeat. The faults' ``time_s`` are
    moved on by ``time_offset_s``, what metrics.csv's writer adds to this launch's records
    (a resumed run's continue the earlier run's clock)."""
    workers = cluster.results(training_kind(config))
    shards = cluster.results(ProcessKind.SHARD)
    reports = route.shard_reports
    return RunResult(
        run_dir,
        final=cluster.results(ProcessKind.EVALUATOR).get(0, route.last_evaluation),
        worker_steps=dict(
            sorted(
                {
                    **route.steps_reached(config.pipeline.num_partitions),
                    **{r: route.steps_in_all_lives(r, w) for r, w in workers.items()},
                }.items()
            )
        ),
        elapsed_s=elapsed_s,
        # Every shard, one that never reported (a job stopped as it started) with no counts.
        staleness={
            f"shard{shard_id}": reports.get(shard_id, {}).get("staleness", {})
            for shard_id in range(config.cluster.num_shards)
        },
        faults=on_metrics_clock(cluster.faults, time_offset_s),
        coordinator=_coordinator(cluster, route, config),
        shards={
            f"shard{shard_id}": {
                "address": shards.get(shard_id, {}).get("address", address),
                "worker_hosts": reports.get(shard_id, {}).get("worker_hosts", {}),
            }
            for shard_id, address in enumerate(addresses)
        },
    )
