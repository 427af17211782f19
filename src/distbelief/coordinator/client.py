"""A worker's connection to the coordinator: ask for work (reporting the portion just finished)
and report pushed bundles, one request at a time, each with a timeout. Knows nothing of models.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from dataclasses import dataclass

from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.portions import Task
from distbelief.coordinator.protocol import (
    BUNDLE,
    LOST_ACTION,
    SESSION_MAX_CHARS,
    STOP_ACTION,
    WAIT_ACTION,
    WORK,
    WORK_ACTION,
    WORKER_ID_MAX_CHARS,
    loss_to_wire,
)
from distbelief.errors import (
    CoordinatorUnavailableError,
    ProtocolError,
)
from distbelief.wire import Message, connect
from distbelief.wire.retry import retry_while_unreachable
from distbelief.wire.security import WireSecurity

_ACTIONS = (WORK_ACTION, WAIT_ACTION, STOP_ACTION, LOST_ACTION)


@dataclass(frozen=True, slots=True)
class Finished:
    """A portion this worker computed, reported with its next request for work."""

    evaluation: int
    portion: int
    loss_sum: float
    coordinator: str | None = None
    """The coordinator life that handed out the task (None: whichever answers)."""


@dataclass(frozen=True, slots=True)
class WorkReply:
    """The coordinator's answer to a request for work."""

    finished: str | None
    """What became of the reported portion (``accepted``, ``duplicate``, ``stale``, ``lost``);
    None when none was reported."""
    action: str
    """``work``, ``wait``, ``stop`` or ``lost``."""
    task: Task | None = None
    plan: BatchPlan | None = None
    """The batch the task's portion belongs to (with every task)."""
    coordinator: str | None = None
    """The coordinator's life (it changes when the coordinator is restarted)."""


class CoordinatorClient:
    """One worker life's requests to the coordinator.

    Args:
        address: The coordinator's address (``tcp://HOST:PORT``).
        worker_id: This worker's name (at most 32 chars), e.g. ``worker2``.
        timeout_s: Limit for each request (a request for work is held at most half of it).
        retry_timeout_s: How long the coordinator may stay unreachable (not started yet, say)
            before a request fails; requests are retried with backoff meanwhile. (A retry goes
            over a new connection, so one that follows a lost reply is told ``lost``.)
        security: The job's wire security.
        source_host: The address of this machine the connection leaves from (default: the
            one the operating system picks).

    Raises:
        ValueError: ``worker_id`` is empty or too long, ``timeout_s`` is not > 0, or the
            address is malformed.
    """

    def __init__(
        self,
        address: str,
        worker_id: str,
        *,
        timeout_s: float = 30.0,
        retry_timeout_s: float = 60.0,
        security: WireSecurity | None = None,
        source_host: str | None = None,
    ) -> None:
        if not isinstance(worker_id, str) or not 0 < len(worker_id) <= WORKER_ID_MAX_CHARS:
            raise ValueError(
                f"worker_id must be a string of 1-{WORKER_ID_MAX_CHARS} chars, got {worker_id!r}"
            )
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.worker_id = worker_id
        self.timeout_s = float(timeout_s)
        self.retry_timeout_s = float(retry_timeout_s)
        self._closing = threading.Event()
        source = {"source_host": source_host} if source_host else {}
        self._rpc = connect(address, name=f"coordinator ({address})", security=security, **source)
        self.renew()

    def renew(self) -> None:
        """Start a new life: a new session, bundles numbered afresh (after being told lost)."""
        self.session = secrets.token_hex(SESSION_MAX_CHARS // 2)
        self._bundle_numbers = itertools.count(1)

    def next_bundle_id(self) -> str:
        """``<worker>-<session>-<n>``: unique per life."""
        return f"{self.worker_id}-{self.session}-{next(self._bundle_numbers)}"

    def _identity(self) -> dict:
        return {"worker": self.worker_id, "session": self.session}

    def ask(self, finished: Finished | None = None, max_wait_s: float = 2.0) -> WorkReply:
        """Report ``finished`` (if any) and ask for work; held up to ``max_wait_s`` (and half
        the request timeout) when there is none.

        Raises:
            CoordinatorUnavailableError: the coordinator did not answer within the retry
                timeout.
            ProtocolError: the reply is malformed.
            RemoteError: the coordinator refused the request (the message says why).
        """
        meta = {**self._identity(), "max_wait_s": min(max_wait_s, self.timeout_s / 2)}
        if finished is not None:
            meta["finished"] = {
                "evaluation": finished.evaluation,
                "portion": finished.portion,
                "loss_sum": loss_to_wire(finished.loss_sum),
            }
            if finished.coordinator is not None:
                meta["finished"]["coordinator"] = finished.coordinator
        reply = self._request(Message(WORK, meta)).meta
        try:
            return _work_reply(reply)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"coordinator: malformed reply to work: {reply!r}") from e

    def bundle_pushed(
        self, evaluation: int, bundle: str, portions: list[int], coordinator: str | None = None
    ) -> str:
        """Report that ``bundle`` (``portions``' gradients summed) was pushed to every shard
        (also when a shard did not have the evaluation open: see ``protocol``); returns
        ``accepted`` (committed), ``refused``, ``stale`` (also when the coordinator life that
        accepted the portions, ``coordinator``, is over) or ``lost``.

        Raises:
            CoordinatorUnavailableError: the coordinator did not answer within the retry
                timeout.
            RemoteError: the coordinator refused the request (the message says why).
        """
        meta = {
            **self._identity(),
            "evaluation": evaluation,
            "bundle": bundle,
            "portions": list(portions),
        }
        if coordinator is not None:
            meta["coordinator"] = coordinator
        return str(self._request(Message(BUNDLE, meta)).meta.get("status"))

    def _request(self, message: Message) -> Message:
        return retry_while_unreachable(
            lambda: self._rpc.request(message, timeout_s=self.timeout_s),
            retry_timeout_s=self.retry_timeout_s,
            closing=self._closing,
            give_up=CoordinatorUnavailableError,
        )

    def close(self) -> None:
        """Drop the connection (the coordinator takes this life as lost); no more retries."""
        self._closing.set()
        self._rpc.close()


def _work_reply(meta: dict) -> WorkReply:
    action = meta["action"]
    if action not in _ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    life = meta.get("coordinator")
    if life is not None and not isinstance(life, str):
        raise ValueError(f"coordinator must be a string, got {life!r}")
    if action != WORK_ACTION:
        return WorkReply(meta.get("finished"), action, coordinator=life)
    raw = meta["task"]
    task = Task(int(raw["evaluation"]), str(raw["point"]), int(raw["portion"]), bool(raw["backup"]))
    return WorkReply(meta.get("finished"), action, task, BatchPlan.from_json(raw["batch"]), life)
