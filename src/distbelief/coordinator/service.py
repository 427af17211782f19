"""The coordinator's service for workers (a ``wire.Service``): WORK and BUNDLE answered through
the PortionScheduler, accepted bundles committed on the shards through a callable, and a closed
connection taken as its worker lost. ``evaluate`` and ``finish`` are for the coordinator's main
thread. It holds no vector: the gradients go from workers to the shards directly.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection

from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.portions import EvaluationOutcome, PortionScheduler
from distbelief.coordinator.protocol import (
    ACCEPTED,
    BUNDLE,
    REFUSED,
    STALE,
    STOP_ACTION,
    WORK,
    life_of,
    loss_from_wire,
    worker_key,
)
from distbelief.errors import EvaluationStalledError, ShardRestartedError
from distbelief.wire.message import Message
from distbelief.wire.ops import OpRegistry
from distbelief.wire.vector_program import BUNDLE_MAX_CHARS, check_vector_name

logger = logging.getLogger(__name__)

Commit = Callable[[int, str], None]
"""``commit(evaluation, bundle)``: add a staged bundle to the evaluation's sum on every shard
(the ``commit`` instruction of a vector program), or raise."""

_WATCH_INTERVAL_S = 0.5
"""How often ``evaluate`` looks for silent workers while it waits."""


def _integer(meta: dict, key: str) -> int:
    value = meta.get(key)
    if type(value) is not int or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    return value


class CoordinatorService:
    """Hands out the portions of each evaluation to the workers that connect, and commits the
    bundles they push.

    Args:
        plan: The batch every evaluation uses and its portions.
        commit: Commits one bundle on every shard (see ``Commit``).
        max_holders: Most workers computing one portion at once (1: no backup copies).
        max_wait_s: Longest a worker's request for work is held when there is none.
        worker_silence_s: A worker holding finished, uncommitted portions that is not heard of
            for this long is declared lost (its portions are handed out again).
    """

    def __init__(
        self,
        plan: BatchPlan,
        commit: Commit,
        *,
        max_holders: int = 2,
        max_wait_s: float = 2.0,
        worker_silence_s: float = 60.0,
    ) -> None:
        if not 0 <= max_wait_s <= 30:
            raise ValueError(f"max_wait_s must be in [0, 30], got {max_wait_s!r}")
        if worker_silence_s <= 0:
            raise ValueError(f"worker_silence_s must be > 0, got {worker_silence_s!r}")
        self.plan = plan
        self.life = secrets.token_hex(8)
        """This coordinator's life: reports of tasks another life handed out are stale."""
        self.scheduler = PortionScheduler(plan, max_holders=max_holders)
        self.max_wait_s = float(max_wait_s)
        self.worker_silence_s = float(worker_silence_s)
        self._commit = commit
        self._commit_lock = threading.Lock()
        self._connections_changed = threading.Condition()
        self._connections: set[WorkerConnection] = set()
        self._told: set[str] = set()
        """Worker ids (``worker0``) told to stop."""
        self._departed: set[str] = set()
        """Worker ids whose every connection closed before they were told to stop: died or
        given up; a later life of one is told when it asks, or by its launcher's stop flag."""
        self.worker_hosts: dict[str, str] = {}
        """Worker id -> the host its connection came from (the last one)."""
        self.handlers = OpRegistry()
        self.handlers.register(WORK, WorkerConnection._work)
        self.handlers.register(BUNDLE, WorkerConnection._bundle)

    def open_connection(self, peer: str) -> WorkerConnection:
        """State for a new worker connection from ``peer`` (counted until it closes)."""
        connection = WorkerConnection(self, peer)
        with self._connections_changed:
            self._connections.add(connection)
        return connection

    def _closed(self, connection: WorkerConnection) -> None:
        with self._connections_changed:
            self._connections.discard(connection)
            still_open = {w for c in self._connections for w in c.worker_ids}
            self._departed |= connection.worker_ids - still_open
            self._connections_changed.notify_all()

    def _told_stop(self, worker_id: str) -> None:
        with self._connections_changed:
            self._told.add(worker_id)
            self._connections_changed.notify_all()

    def commit_bundle(self, worker: str, evaluation: int, bundle: str) -> bool:
        """Commit a claimed bundle on the shards; False (the evaluation fails) if that fails."""
        try:
            with self._commit_lock:
                self._commit(evaluation, bundle)
        except Exception as e:  # any failure of the shards fails the evaluation, typed there
            # A restarted shard is a fault the job recovers from (the coordinator goes back to
            # its last checkpoint, and says so): no error of the coordinator's. Nor is a late
            # bundle of an evaluation already over (gone back from after such a restart).
            recovered = isinstance(e, ShardRestartedError) or not self.scheduler.is_open(evaluation)
            logger.log(
                logging.WARNING if recovered else logging.ERROR,
                "evaluation %d: bundle %s from %s %s: %s",
                evaluation,
                bundle,
                worker,
                "not committed" if recovered else "could not be committed",
                e,
            )
            self.scheduler.commit_failed(evaluation, bundle, e)
            return False
        self.scheduler.committed(evaluation, bundle)
        return True

    def evaluate(self, evaluation: int, point: str, timeout_s: float) -> EvaluationOutcome:
        """Have the workers compute the loss and gradient sums of the batch at vector ``point``.

        The caller has opened ``evaluation`` on the shards (``open_evaluation``); when this
        returns, every portion's gradient is committed there, exactly once, and the caller
        closes it. Blocks until then.

        Args:
            evaluation: Its number, above every earlier one.
            point: The vector the workers read and take the gradient at.
            timeout_s: Longest time without any portion finished or committed.

        Returns:
            The loss sum over the batch, its number of examples and the figures.

        Raises:
            ValueError: ``evaluation`` is not above the earlier ones, ``point`` is not a vector
                name, or ``timeout_s`` is not > 0.
            EvaluationStalledError: no portion was finished or committed for ``timeout_s``.
            CoordinatorError: committing a bundle on the shards failed.
        """
        check_vector_name(point)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.scheduler.open(evaluation, point)
        try:
            outcome = self._wait_until_complete(evaluation, timeout_s)
        finally:
            self.scheduler.close()
        figures = outcome.figures
        logger.info(
            "evaluation %d: loss %.6g over %d examples in %.2fs (%d backups, %d won, "
            "%d reassigned)",
            evaluation,
            outcome.loss_sum / outcome.num_examples,
            outcome.num_examples,
            figures.time_s,
            figures.backups_issued,
            figures.backups_won,
            figures.reassigned,
        )
        return outcome

    def _wait_until_complete(self, evaluation: int, timeout_s: float) -> EvaluationOutcome:
        scheduler = self.scheduler
        changes, completions = scheduler.changes, scheduler.completions
        progressed_s = time.monotonic()
        while (outcome := scheduler.outcome()) is None:
            now = time.monotonic()
            if scheduler.completions != completions:
                completions, progressed_s = scheduler.completions, now
            elif now - progressed_s > timeout_s:
                raise EvaluationStalledError(
                    f"evaluation {evaluation}: no portion finished for {timeout_s:g}s "
                    f"({scheduler.describe()}; {self.num_connections} worker connections)"
                )
            for worker in scheduler.silent_workers(self.worker_silence_s):
                logger.warning("%s silent for %gs: declared lost", worker, self.worker_silence_s)
                scheduler.lose(worker)
            wait_s = min(_WATCH_INTERVAL_S, max(0.0, progressed_s + timeout_s - now) + 0.01)
            changes = scheduler.wait_for_change(changes, wait_s)
        return outcome

    @property
    def num_connections(self) -> int:
        """Workers connected now."""
        with self._connections_changed:
            return len(self._connections)

    def finish(self, timeout_s: float = 10.0, expected: Collection[str] = ()) -> int:
        """Tell every worker to stop, and wait (up to ``timeout_s``) until each connected one
        has been told or has gone, and each worker id in ``expected`` (``worker0``, ...) has
        been told or has gone: a worker still starting up finds the coordinator there to tell
        it, while one that connected and died is not waited for (it may never come back).

        Returns:
            The number of workers not told (yet): expected ones, and connections that name
            none of them (each worker counted once, connected or not).
        """
        self.scheduler.stop()
        missing = set(expected)

        def untold() -> int:
            waiting = missing - self._told - self._departed
            connections = sum(
                not c.told_stop and not (c.worker_ids & waiting) for c in self._connections
            )
            return connections + len(waiting)

        with self._connections_changed:
            self._connections_changed.wait_for(lambda: untold() == 0, timeout_s)
            return untold()


class WorkerConnection:
    """One worker's connection: the lives it named, lost when it closes."""

    def __init__(self, service: CoordinatorService, peer: str) -> None:
        self.service = service
        self.scheduler = service.scheduler
        self.peer = peer
        self.workers: set[str] = set()
        """The lives (``worker0-<session>``) this connection named."""
        self.worker_ids: set[str] = set()
        """Their worker ids (``worker0``)."""
        self.told_stop = False

    def close(self) -> None:
        for worker in self.workers:
            reverted = self.scheduler.lose(worker)
            if reverted:
                logger.warning(
                    "%s (%s) lost: %d portions handed out again", worker, self.peer, reverted
                )
        self.service._closed(self)

    def _worker(self, meta: dict) -> str:
        worker = worker_key(meta)
        if worker not in self.workers:
            self.workers.add(worker)
            self.worker_ids.add(meta["worker"])
            self.service.worker_hosts[meta["worker"]] = self.peer.rpartition(":")[0]
        return worker

    def _work(self, request: Message) -> Message:
        worker = self._worker(request.meta)
        # Checked before the report is recorded: a refused request changes nothing.
        wait_s = self._wait_of(request.meta)
        reply: dict = {"coordinator": self.service.life}
        finished = request.meta.get("finished")
        if finished is not None:
            if not isinstance(finished, dict):
                raise ValueError(f"finished must be an object, got {finished!r}")
            evaluation, portion = _integer(finished, "evaluation"), _integer(finished, "portion")
            loss_sum = loss_from_wire(finished.get("loss_sum"))
            if life_of(finished) not in (None, self.service.life):
                reply["finished"] = STALE  # computed for a coordinator that has died since
            else:
                reply["finished"] = self.scheduler.finish(worker, evaluation, portion, loss_sum)
        action, task = self.scheduler.next_task(worker, wait_s)
        reply["action"] = action
        if task is not None:
            reply["task"] = {
                "evaluation": task.evaluation,
                "point": task.point,
                "portion": task.portion,
                "backup": task.backup,
                "batch": self.service.plan.to_json(),
            }
        if action == STOP_ACTION:
            self.told_stop = True
            self.service._told_stop(request.meta["worker"])
        return request.reply(reply)

    def _wait_of(self, meta: dict) -> float:
        """How long a WORK request may be held when there is no work (at most the service's
        ``max_wait_s``)."""
        max_wait_s = meta.get("max_wait_s", self.service.max_wait_s)
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)):
            raise ValueError(f"max_wait_s must be a number, got {max_wait_s!r}")
        return min(max(0.0, float(max_wait_s)), self.service.max_wait_s)

    def _bundle(self, request: Message) -> Message:
        worker = self._worker(request.meta)
        evaluation = _integer(request.meta, "evaluation")
        bundle, portions = request.meta.get("bundle"), request.meta.get("portions")
        if (
            not isinstance(bundle, str)
            or not bundle.startswith(f"{worker}-")
            or len(bundle) > BUNDLE_MAX_CHARS
        ):
            raise ValueError(
                f"bundle must be named {worker}-<n> (at most {BUNDLE_MAX_CHARS} chars), "
                f"got {bundle!r}"
            )
        if life_of(request.meta) not in (None, self.service.life):
            return request.reply({"status": STALE, "coordinator": self.service.life})
        status = self.scheduler.claim_bundle(worker, evaluation, bundle, portions)
        if status == ACCEPTED and not self.service.commit_bundle(worker, evaluation, bundle):
            status = REFUSED
        return request.reply({"status": status, "coordinator": self.service.life})
