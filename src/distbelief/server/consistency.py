"""How a shard orders updates from many workers: async, bounded staleness (SSP) or synchronous
rounds with backup workers, each a policy object, plus the worker liveness all three rely on.

Pure bookkeeping under the shard's lock: a policy says whether a push is applied now and whether
a pull must wait; the shard does the locking, the waiting and the versioning.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from distbelief.config import ConsistencyConfig
from distbelief.server import sessions
from distbelief.server.staleness import adjust_gradient
from distbelief.server.store import ShardStore


@dataclass(slots=True)
class _Worker:
    clock: int
    offset: int
    last_seen_s: float
    departed: bool = False


@dataclass(slots=True)
class WorkerClocks:
    """Each worker's step count ("clock") and when it was last heard from.

    A worker that joins late starts level with the slowest live worker (its clock is offset),
    so a newcomer never holds the others back while it catches up from step 0. So does a
    worker heard from again after it counted as dead (silent for the liveness timeout, or its
    connections closed): the others went on without it, and it rejoins level with them rather
    than holding them back until it has redone the steps it missed.
    """

    liveness_timeout_s: float
    workers: dict[str, _Worker] = field(default_factory=dict)

    def touch(self, worker: str, clock: int, now_s: float | None = None) -> None:
        now_s = time.monotonic() if now_s is None else now_s
        entry = self.workers.get(worker)
        if entry is None or not self.is_live(entry, now_s):
            # New, or back from the dead: ``slowest_clock`` counts live workers only, so not
            # this one's stale clock. A returning worker keeps at least the offset it had.
            slowest = self.slowest_clock(now_s)
            offset = 0 if entry is None else entry.offset
            if slowest is not None:
                offset = max(offset, slowest - clock)
            if entry is None:
                self._forget_the_longest_dead(now_s)
            self.workers[worker] = _Worker(clock, offset, now_s)
            return
        entry.clock = max(entry.clock, clock)
        entry.last_seen_s = now_s

    def _forget_the_longest_dead(self, now_s: float) -> None:
        """Makes room for a new worker past ``MAX_CLIENT_SESSIONS`` (each ``DownpourSGD`` is a
        new worker id by default): the dead worker heard from longest ago is forgotten (were
        it to come back, it would rejoin as a newcomer does, level with the others)."""
        if len(self.workers) < sessions.MAX_CLIENT_SESSIONS:
            return
        dead = [(e.last_seen_s, w) for w, e in self.workers.items() if not self.is_live(e, now_s)]
        if dead:
            del self.workers[min(dead)[1]]

    def depart(self, worker: str) -> None:
        if worker in self.workers:
            self.workers[worker].departed = True

    def is_live(self, entry: _Worker, now_s: float) -> bool:
        return not entry.departed and now_s - entry.last_seen_s < self.liveness_timeout_s

    def live_count(self, now_s: float | None = None) -> int:
        now_s = time.monotonic() if now_s is None else now_s
        return sum(self.is_live(entry, now_s) for entry in self.workers.values())

    def dead_count(self, now_s: float | None = None) -> int:
        now_s = time.monotonic() if now_s is None else now_s
        return sum(not self.is_live(entry, now_s) for entry in self.workers.values())

    def effective_clock(self, worker: str) -> int | None:
        entry = self.workers.get(worker)
        return None if entry is None else entry.clock + entry.offset

    def slowest_clock(self, now_s: float | None = None) -> int | None:
        now_s = time.monotonic() if now_s is None else now_s
        clocks = [e.clock + e.offset for e in self.workers.values() if self.is_live(e, now_s)]
        return min(clocks) if clocks else None

    def too_far_ahead(self, worker: str, max_staleness: int, now_s: float | None = None) -> bool:
        """Whether ``worker`` must wait for the slowest live worker (SSP)."""
        clock, slowest = self.effective_clock(worker), self.slowest_clock(now_s)
        return clock is not None and slowest is not None and clock - slowest > max_staleness


ApplyUpdate = Callable[[Sequence[torch.Tensor]], None]
"""The shard's update: one optimizer step with these gradients, and a new version."""


class ConsistencyPolicy(abc.ABC):
    """What the shard asks of its consistency model; subclasses are the three models.

    Args:
        config: The consistency settings.
        clocks: The shard's worker clocks (the shard touches them, the policy reads them).
    """

    def __init__(self, config: ConsistencyConfig, clocks: WorkerClocks, num_workers: int) -> None:
        self.config = config
        self.clocks = clocks
        self.num_workers = num_workers
        """The job's workers: how many gradients a synchronous round expects."""
        self._store: ShardStore | None = None
        self._apply: ApplyUpdate | None = None

    def bind(self, store: ShardStore, apply: ApplyUpdate) -> None:
        """The shard holds new parameters (initialised or restored): keep state over them."""
        self._store, self._apply = store, apply

    @abc.abstractmethod
    def push(
        self,
        grads: Sequence[torch.Tensor],
        *,
        worker: str | None,
        staleness: int,
        base_version: int,
        version: int,
    ) -> bool:
        """Apply or collect one gradient (may be modified in place); False: dropped.

        Args:
            grads: One tensor per parameter slice.
            worker: Who pushed; None for anonymous callers.
            staleness: Updates applied since the worker's fetch.
            base_version: The shard version the gradient was computed from.
            version: The shard's version now.
        """

    def must_hold(self, worker: str | None, after_version: int | None, version: int) -> bool:
        """Whether a pull of ``worker`` must wait. ``after_version``: answer only once the
        shard's version exceeds it."""
        return after_version is not None and version <= after_version

    tracks_pulls = False
    """Whether ``pulled`` does anything (the shard skips the call when not: a pull's hot path)."""

    def pulled(self, worker: str | None, generation: int) -> None:
        """``worker`` was just sent the parameters of ``generation`` (under the shard's lock)."""
        return  # by default nothing is kept per worker

    @property
    def pulls_are_plain(self) -> bool:
        """Whether every pull (without ``after_version``) is answered at once and leaves
        nothing behind: clients on the shard's host may then read the parameters without a
        request (``wire/shared_params.py``)."""
        return False

    def describe(self) -> dict:
        """Every setting, for the handshake: shards of one model must agree on all of them."""
        settings = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        return {**settings, "num_workers": self.num_workers}


def _fetched_name(worker: str) -> str:
    return f"dc-asgd.fetched.{worker}"


class AsyncPolicy(ConsistencyPolicy):
    """Downpour: every push is applied at once, adjusted for its staleness (none, scale,
    dc-asgd).

    Under dc-asgd the parameters last sent to each worker are kept in the store, per worker id,
    so a push is compensated even when it arrives on a new connection (a reconnect); a worker
    whose connections have all closed loses its copy once a new worker's is made. Only dc-asgd
    pays for that copy per pull.
    """

    def __init__(self, config: ConsistencyConfig, clocks: WorkerClocks, num_workers: int) -> None:
        super().__init__(config, clocks, num_workers)
        self._keeps_fetched = config.staleness_policy == "dc-asgd"
        self.tracks_pulls = self._keeps_fetched
        self._fetched_generation: dict[str, int] = {}

    def bind(self, store: ShardStore, apply: ApplyUpdate) -> None:
        super().bind(store, apply)
        self._fetched_generation.clear()

    def push(self, grads, *, worker, staleness, base_version, version) -> bool:
        store, apply = self._store, self._apply
        assert store is not None and apply is not None
        fetched = None
        if self._keeps_fetched and worker is not None:
            fetched = store.find(_fetched_name(worker))
        config = self.config
        apply(
            adjust_gradient(
                config.staleness_policy,
                grads,
                staleness=staleness,
                params_now=store.params,
                params_fetched=fetched,
                dc_lambda=config.dc_lambda,
            )
        )
        return True

    @property
    def pulls_are_plain(self) -> bool:
        return not self._keeps_fetched

    def pulled(self, worker: str | None, generation: int) -> None:
        if not self._keeps_fetched or worker is None:
            return
        if self._fetched_generation.get(worker) == generation:
            return  # this worker already holds a copy of these values
        store = self._store
        assert store is not None
        name = _fetched_name(worker)
        buffer = store.find(name)
        if buffer is None:
            self._forget_departed_workers()
            # Not persistent: after a shard restart the first push of each worker goes
            # uncompensated, rather than every checkpoint holding a copy per worker.
            empty = [torch.empty_like(p) for p in store.params]
            buffer = store.add(name, empty, persistent=False)
        torch._foreach_copy_(buffer, store.params)
        self._fetched_generation[worker] = generation

    def _forget_departed_workers(self) -> None:
        """Drops the copies of workers whose connections have all closed, as a new worker's
        copy is made: each script run under a new default worker id cost a whole slice for
        good. Not as a worker leaves: one whose request failed closes its connection before it
        dials again, and its retried push is still compensated."""
        store = self._store
        assert store is not None
        for worker in list(self._fetched_generation):
            entry = self.clocks.workers.get(worker)
            if entry is None or entry.departed:
                del self._fetched_generation[worker]
                store.remove(_fetched_name(worker))


class BoundedStalenessPolicy(AsyncPolicy):
    """Stale synchronous parallel (Ho et al. 2013): async updates, but a worker's pull is held
    while it is more than ``max_staleness`` steps ahead of the slowest live worker."""

    def must_hold(self, worker: str | None, after_version: int | None, version: int) -> bool:
        max_staleness = self.config.max_staleness
        assert max_staleness is not None
        if worker is not None and self.clocks.too_far_ahead(worker, max_staleness):
            return True
        return super().must_hold(worker, after_version, version)

    @property
    def pulls_are_plain(self) -> bool:
        return False  # a pull may be held


class SyncRoundsPolicy(ConsistencyPolicy):
    """Synchronous rounds with backup workers (Chen et al. 2016): the mean of the first
    ``num_workers - backup_workers`` gradients of a round is applied once; later ones for a
    closed round are dropped, and so is a second one of a worker id for the open round (a
    restarted worker's, whose dead life's gradient the round holds). Dead workers shrink the
    quorum."""

    def __init__(self, config: ConsistencyConfig, clocks: WorkerClocks, num_workers: int) -> None:
        super().__init__(config, clocks, num_workers)
        self._started_s = time.monotonic()
        self._round_sum: list[torch.Tensor] = []
        self._round_count = 0
        self._rounds_joined: dict[str, int] = {}
        """The version at which each worker's last gradient joined a round (its round closes
        by passing it)."""

    def bind(self, store: ShardStore, apply: ApplyUpdate) -> None:
        super().bind(store, apply)
        # Not persistent: a restored shard starts a fresh round, as its workers re-push.
        self._round_sum = store.add("sync.round_sum", persistent=False)
        self._round_count = 0
        self._rounds_joined.clear()  # the fresh round holds no one's gradient

    def push(self, grads, *, worker, staleness, base_version, version) -> bool:
        if base_version < version:
            return False  # a backup worker's late gradient: its round is closed
        if worker is not None and self._rounds_joined.get(worker) == version:
            # The open round holds a gradient of this worker id already: a restarted worker's
            # dead life pushed it. Dropped rather than replacing it: the round sums gradients
            # (it keeps no one's own to take back out), the one it holds is as good (computed
            # from the same version), and a worker counts once toward the quorum.
            return False
        # A base ahead of the version was pulled from this shard before it was restored from
        # an older checkpoint: the rounds between are lost, and the gradient joins this one.
        torch._foreach_add_(self._round_sum, list(grads))
        self._round_count += 1
        if worker is not None:
            self._rounds_joined[worker] = version
        self._close_round_if_complete()
        return True

    def must_hold(self, worker: str | None, after_version: int | None, version: int) -> bool:
        if after_version is None:
            return False
        if worker is not None:
            # Only the open round that holds this worker's gradient is worth waiting for. A
            # gradient dropped as late, or lost with an earlier life of a restored shard, is in
            # no round: holding its pull would hold back its next push, which a round may need.
            if self._rounds_joined.get(worker) != version:
                return False
        elif version > after_version:
            return False
        # Re-check the quorum, which shrinks when a worker dies.
        return not self._close_round_if_complete()

    def _round_quorum(self) -> int:
        config, clocks = self.config, self.clocks
        now_s = time.monotonic()
        seen = len(clocks.workers)
        if seen <= self.num_workers:
            dead = clocks.dead_count(now_s)
            if now_s - self._started_s > config.liveness_timeout_s:
                # Workers that never showed up within a liveness period count as dead too.
                dead += self.num_workers - seen
            return max(1, self.num_workers - config.backup_workers - dead)
        # More ids than the job's workers: one took the place of one that left (a script's
        # replica started again, under a new default worker id), and the round waits for it
        # as for the one it replaced once it has pushed (it closed on the one that stayed
        # alone, counting the one that left as dead and the new one as one worker more). A
        # client that only pulls (reading the parameters) is no worker of the rounds.
        pushing = sum(
            worker in self._rounds_joined and clocks.is_live(entry, now_s)
            for worker, entry in clocks.workers.items()
        )
        return max(1, min(pushing, self.num_workers) - config.backup_workers)

    def _close_round_if_complete(self) -> bool:
        """Apply the mean of the round's gradients once enough workers have pushed."""
        if not self._round_count or self._round_count < self._round_quorum():
            return False
        assert self._apply is not None
        torch._foreach_div_(self._round_sum, float(self._round_count))
        self._apply(self._round_sum)
        torch._foreach_zero_(self._round_sum)
        self._round_count = 0
        return True


def consistency_policy(
    config: ConsistencyConfig, clocks: WorkerClocks, num_workers: int = 1
) -> ConsistencyPolicy:
    """The policy ``config`` describes: sync rounds, SSP (a staleness bound) or async.
    ``num_workers``: the job's workers (how many gradients a synchronous round expects)."""
    if config.sync:
        return SyncRoundsPolicy(config, clocks, num_workers)
    if config.max_staleness is not None:
        return BoundedStalenessPolicy(config, clocks, num_workers)
    return AsyncPolicy(config, clocks, num_workers)
