"""Who holds, finished and committed each portion of a Sandblaster evaluation
(``PortionScheduler``), and the outcome of a complete one. Pure logic and thread-safe: no
sockets, no shards, no vectors.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.protocol import (
    ACCEPTED,
    DUPLICATE,
    LOST,
    LOST_ACTION,
    REFUSED,
    STALE,
    STOP_ACTION,
    WAIT_ACTION,
    WORK_ACTION,
)
from distbelief.errors import CoordinatorError


@dataclass(frozen=True, slots=True)
class Task:
    """One portion handed to a worker."""

    evaluation: int
    point: str
    """The vector the gradient is taken at (the worker reads it from the shards)."""
    portion: int
    backup: bool
    """A copy of a portion another worker is computing too (the first answer wins)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluationFigures:
    """How the work of one evaluation went."""

    portions_by_worker: dict[str, int]
    """Committed portions per worker life (``<worker>-<session>``)."""
    backups_issued: int
    """Backup copies handed out."""
    backups_won: int
    """Committed portions whose accepted answer came from a backup copy."""
    duplicates: int
    """Answers refused because another worker had finished the portion first."""
    reassigned: int
    """Times a portion went back to pending (its worker lost, or its bundle refused)."""
    time_s: float
    """Seconds from opening the evaluation to its last commit."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluationOutcome:
    """A complete evaluation: the batch's loss sum and the figures."""

    evaluation: int
    loss_sum: float
    """Sum of the committed portions' loss sums (the shards hold the matching gradient sum)."""
    num_examples: int
    """Examples in the batch (divide the sums by it for means)."""
    figures: EvaluationFigures


@dataclass(slots=True)
class _Portion:
    holders: dict[str, bool] = field(default_factory=dict)
    """Workers computing it -> whether as a backup."""
    done_by: str | None = None
    done_as_backup: bool = False
    loss_sum: float = 0.0
    bundle: str | None = None
    """The bundle it is being committed in (set once the bundle's report is accepted)."""
    committed: bool = False

    @property
    def pending(self) -> bool:
        return self.done_by is None and not self.holders


class PortionScheduler:
    """The state of every portion of the open evaluation, and the rules for handing them out.

    A free worker gets a pending portion, else a backup copy of an unfinished one (fewest
    holders first, at most ``max_holders`` each), else waits. The first answer for a portion
    wins; a bundle is committed only if all its portions are still done by its worker. A lost
    worker's done but uncommitted portions go back to pending, and it is told so.

    Args:
        plan: The batch and its portions.
        max_holders: Most workers computing one portion at once (1: no backups).
    """

    def __init__(self, plan: BatchPlan, *, max_holders: int = 2) -> None:
        if type(max_holders) is not int or max_holders < 1:
            raise ValueError(f"max_holders must be an integer >= 1, got {max_holders!r}")
        self.plan = plan
        self.max_holders = max_holders
        self._changed = threading.Condition()
        self._evaluation: int | None = None
        self._last_evaluation = -1
        self._point = ""
        self._portions: list[_Portion] = []
        self._lost: set[str] = set()
        self._last_seen_s: dict[str, float] = {}
        self._stopped = False
        self._failure: CoordinatorError | None = None
        self._opened_s = self._completed_s = 0.0
        self._counts = {"backups_issued": 0, "duplicates": 0, "reassigned": 0}
        self.changes = 0
        """Grows at every change of state (what :meth:`wait_for_change` waits for)."""
        self.completions = 0
        """Grows whenever a portion is accepted or committed: progress of the evaluation."""

    def _touch(self) -> None:
        self.changes += 1
        self._changed.notify_all()

    def open(self, evaluation: int, point: str) -> None:
        """Hand out the portions of ``evaluation`` at vector ``point``, all pending.

        Raises:
            ValueError: ``evaluation`` is not above every earlier one.
        """
        with self._changed:
            if type(evaluation) is not int or evaluation <= self._last_evaluation:
                raise ValueError(
                    f"evaluation must be an integer above {self._last_evaluation}, "
                    f"got {evaluation!r}"
                )
            self._evaluation, self._last_evaluation, self._point = evaluation, evaluation, point
            self._portions = [_Portion() for _ in range(self.plan.num_portions)]
            self._failure = None
            self._counts = dict.fromkeys(self._counts, 0)
            self._opened_s, self._completed_s = time.monotonic(), 0.0
            self._touch()

    def is_open(self, evaluation: int) -> bool:
        """Whether ``evaluation`` is the one open now (not closed, nor gone back from)."""
        with self._changed:
            return evaluation == self._evaluation

    def close(self) -> None:
        """End the open evaluation: no more tasks; reports for it are stale from now on."""
        with self._changed:
            self._evaluation = None
            self._touch()

    def stop(self) -> None:
        """Tell every worker to stop at its next request."""
        with self._changed:
            self._stopped = True
            self._touch()

    def _open_portions(self, evaluation: object, portions: list) -> list[_Portion] | None:
        """The states of ``portions`` of the open ``evaluation`` (None: it is not open).

        Raises:
            ValueError: a portion does not exist.
        """
        if type(evaluation) is not int or evaluation != self._evaluation:
            return None
        for portion in portions:
            self.plan.portion_range(portion)  # ValueError if there is no such portion
        return [self._portions[portion] for portion in portions]

    def next_task(self, worker: str, max_wait_s: float = 0.0) -> tuple[str, Task | None]:
        """What ``worker`` does next: ``("work", task)``, ``("wait", None)``, ``("stop", None)``
        or ``("lost", None)``. Waits up to ``max_wait_s`` for work, unless the worker holds
        finished portions it must push first."""
        deadline = time.monotonic() + max_wait_s
        with self._changed:
            while True:
                action, task = self._next_task_locked(worker)
                remaining_s = deadline - time.monotonic()
                if action != WAIT_ACTION or remaining_s <= 0 or self._holds_uncommitted(worker):
                    return action, task
                self._changed.wait(remaining_s)

    def _next_task_locked(self, worker: str) -> tuple[str, Task | None]:
        self._last_seen_s[worker] = time.monotonic()
        if worker in self._lost:
            return LOST_ACTION, None
        if self._stopped:
            return STOP_ACTION, None
        if self._evaluation is None or self._failure is not None:
            return WAIT_ACTION, None
        chosen = next((i for i, p in enumerate(self._portions) if p.pending), None)
        backup = chosen is None
        if backup:
            chosen = self._backup_for(worker)
            if chosen is None:
                return WAIT_ACTION, None
            self._counts["backups_issued"] += 1
        self._portions[chosen].holders[worker] = backup
        return WORK_ACTION, Task(self._evaluation, self._point, chosen, backup)

    def _backup_for(self, worker: str) -> int | None:
        candidates = [
            (len(p.holders), index)
            for index, p in enumerate(self._portions)
            if p.done_by is None and worker not in p.holders and len(p.holders) < self.max_holders
        ]
        return min(candidates)[1] if candidates else None

    def _holds_uncommitted(self, worker: str) -> bool:
        return any(p.done_by == worker and not p.committed for p in self._portions)

    def finish(self, worker: str, evaluation: int, portion: int, loss_sum: float) -> str:
        """``worker`` finished ``portion``: ``accepted`` (the first answer), ``duplicate``,
        ``stale`` (not the open evaluation) or ``lost`` (this worker was declared lost).

        Raises:
            ValueError: the portion does not exist, or was not given to ``worker``.
        """
        with self._changed:
            self._last_seen_s[worker] = time.monotonic()
            if worker in self._lost:
                return LOST
            states = self._open_portions(evaluation, [portion])
            if states is None:
                return STALE
            state = states[0]
            as_backup = state.holders.pop(worker, None)
            if as_backup is None:
                raise ValueError(
                    f"portion {portion} of evaluation {evaluation} was not given to {worker}"
                )
            if state.done_by is not None:
                self._counts["duplicates"] += 1
                return DUPLICATE
            state.done_by, state.done_as_backup, state.loss_sum = worker, as_backup, loss_sum
            self.completions += 1
            self._touch()
            return ACCEPTED

    def claim_bundle(self, worker: str, evaluation: int, bundle: str, portions: list[int]) -> str:
        """``worker`` pushed ``bundle`` holding ``portions`` to every shard. ``accepted``: the
        caller commits it on the shards, then calls :meth:`committed` (or
        :meth:`commit_failed`). ``refused`` (a portion is no longer done by ``worker``; those
        that are go back to pending), ``stale`` or ``lost``: it must not be committed.

        Raises:
            ValueError: ``portions`` is empty, repeats a portion or names one that does not exist.
        """
        with self._changed:
            self._last_seen_s[worker] = time.monotonic()
            if worker in self._lost:
                return LOST
            if (
                not isinstance(portions, list)
                or not portions
                # Numbers only: a list or object among them cannot go in a set.
                or not all(type(portion) is int for portion in portions)
                or len(set(portions)) != len(portions)
            ):
                raise ValueError(f"a bundle lists distinct portions, got {portions!r}")
            states = self._open_portions(evaluation, portions)
            if states is None:
                return STALE
            if all(state.done_by == worker and state.bundle is None for state in states):
                for state in states:
                    state.bundle = bundle
                return ACCEPTED
            for state in states:
                if state.done_by == worker and state.bundle is None:
                    self._revert(state)
            return REFUSED

    def _revert(self, state: _Portion) -> None:
        """A finished, uncommitted portion goes back to pending (or to its backup holders)."""
        state.done_by, state.done_as_backup, state.loss_sum = None, False, 0.0
        self._counts["reassigned"] += 1
        self._touch()

    def committed(self, evaluation: int, bundle: str) -> None:
        """The shards have added ``bundle`` (claimed by :meth:`claim_bundle`) to their sum."""
        with self._changed:
            if evaluation != self._evaluation:
                return  # the evaluation was abandoned meanwhile
            for state in self._portions:
                if state.bundle == bundle:
                    state.committed = True
            if all(state.committed for state in self._portions):
                self._completed_s = time.monotonic()
            self.completions += 1
            self._touch()

    def commit_failed(self, evaluation: int, bundle: str, error: Exception) -> None:
        """Committing ``bundle`` failed on a shard: the evaluation cannot complete."""
        with self._changed:
            if evaluation == self._evaluation:
                self._failure = CoordinatorError(
                    f"evaluation {evaluation}: committing bundle {bundle!r} failed: {error}"
                )
                self._touch()

    def lose(self, worker: str) -> int:
        """``worker`` is gone (or declared dead): what it held is freed, what it finished but
        was not committed goes back to pending, and its later reports are refused.

        Returns:
            The number of portions that went back to pending.
        """
        with self._changed:
            self._lost.add(worker)
            self._last_seen_s.pop(worker, None)
            reverted = 0
            for state in self._portions:
                held = state.holders.pop(worker, None) is not None
                if state.done_by == worker and state.bundle is None:
                    self._revert(state)
                    reverted += 1
                elif held and state.pending:
                    self._counts["reassigned"] += 1
                    reverted += 1
            self._touch()
            return reverted

    def silent_workers(self, silence_s: float) -> list[str]:
        """Workers holding finished, uncommitted portions that have not been heard of for
        ``silence_s`` (one computing a portion is not asked to report meanwhile)."""
        now = time.monotonic()
        with self._changed:
            return [
                worker
                for worker, seen_s in self._last_seen_s.items()
                if now - seen_s > silence_s and self._holds_uncommitted(worker)
            ]

    def wait_for_change(self, seen: int, timeout_s: float) -> int:
        """Block until :attr:`changes` differs from ``seen`` (at most ``timeout_s``); returns
        it."""
        with self._changed:
            self._changed.wait_for(lambda: self.changes != seen, timeout_s)
            return self.changes

    def describe(self) -> str:
        """Where the open evaluation stands, for messages: portions committed, done, held."""
        with self._changed:
            committed = sum(p.committed for p in self._portions)
            done = sum(p.done_by is not None and not p.committed for p in self._portions)
            held = sum(p.done_by is None and bool(p.holders) for p in self._portions)
            return (
                f"{committed} of {len(self._portions)} portions committed, {done} finished "
                f"but not committed, {held} being computed"
            )

    def outcome(self) -> EvaluationOutcome | None:
        """The open evaluation's outcome once every portion is committed (else None).

        Raises:
            CoordinatorError: a commit failed.
        """
        with self._changed:
            if self._failure is not None:
                raise self._failure
            if self._evaluation is None or not all(p.committed for p in self._portions):
                return None
            by_worker: dict[str, int] = {}
            for state in self._portions:
                assert state.done_by is not None
                by_worker[state.done_by] = by_worker.get(state.done_by, 0) + 1
            figures = EvaluationFigures(
                portions_by_worker=by_worker,
                backups_won=sum(state.done_as_backup for state in self._portions),
                time_s=self._completed_s - self._opened_s,
                **self._counts,
            )
            return EvaluationOutcome(
                evaluation=self._evaluation,
                loss_sum=math.fsum(state.loss_sum for state in self._portions),
                num_examples=self.plan.size,
                figures=figures,
            )
