"""ParameterShard: the authoritative values of one shard's slice of every parameter.

Pure state and math: no sockets. The buffers live in a ShardStore; the shard adds the lock, the
versions and the layout. Updates are applied one at a time under the lock (no lost updates); a
pull copies a consistent snapshot under the same lock. The consistency policy (async, SSP, sync
rounds) decides when a push is applied and when a pull may be answered. Sandblaster's vector
programs and gradient bundles (``server/shard_vectors.py``) and checkpoints' snapshots and
restores (``server/shard_state.py``) run under the same lock.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from distbelief.config import ConsistencyConfig, check_count
from distbelief.errors import (
    LayoutMismatchError,
    ModelMismatchError,
    ShardEmptyError,
    ShardListError,
)
from distbelief.server.changes import ChangeLog, keeps_support
from distbelief.server.consistency import WorkerClocks, consistency_policy
from distbelief.server.durability import ShardDurability
from distbelief.server.optimizers import ServerOptimizerFactory
from distbelief.server.presence import WorkerPresence
from distbelief.server.sessions import remember
from distbelief.server.shard_state import ShardCheckpoints, ShardState, check_slices
from distbelief.server.shard_vectors import ShardVectorOps
from distbelief.server.staleness import StalenessHistogram
from distbelief.server.store import ShardStore
from distbelief.server.vectors import EvaluationAccumulator
from distbelief.sharding import (
    FlatPartitioner,
    Partitioner,
    ShardSlice,
    TensorSpec,
    describe_misfit,
    describe_mismatch,
    describe_partitioner,
    layout_fingerprint,
)
from distbelief.wire.shared_params import SharedTensors
from distbelief.wire.shared_params import supported as sharing_supported

__all__ = [
    "ParameterShard",
    "PullResult",
    "PushResult",
    "ShardCounters",
    "ShardState",
    "check_listed_place",
]
"""``ShardState`` lives in ``server/shard_state.py``; importable from here as before."""


@dataclass(frozen=True, slots=True)
class ShardCounters:
    """What a shard has done so far."""

    version: int
    num_pushes: int
    num_pulls: int
    num_dropped: int


@dataclass(frozen=True, slots=True)
class PushResult:
    """What became of one pushed gradient."""

    version: int
    staleness: int
    applied: bool
    """False when a synchronous round closed before this gradient arrived (a late backup), or
    the open round holds one of this worker id's already (from a restarted worker's dead
    life)."""
    epoch: int = 0
    """Checkpoints begun before it was applied (``server/durability.py``)."""
    divisor: int = 1
    """What the gradient was divided by before it was applied (the ``scale`` policy)."""
    durable: dict | None = None
    """``ShardDurability.describe()`` as of this push."""
    duplicate: bool = False
    """A retry of a push seen before, answered again (not applied twice)."""


@dataclass(frozen=True, slots=True)
class PullResult:
    version: int
    held: bool
    """True when the pull had to wait longer than allowed and carries no parameters."""
    generation: int = 0
    """Names the parameter values copied out (see ``pull_into``'s ``outs_generation``)."""
    durable: dict | None = None
    """``ShardDurability.describe()`` as of this pull."""
    changes: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per slice, (indices, values) of the elements changed since the pull's
    ``changes_since``, instead of a copy into its ``outs`` (None: ``outs`` were filled)."""


def check_listed_place(shard_id: int, num_shards: int, listed_as: object) -> None:
    """Raise ShardListError unless a client that lists this shard at ``listed_as`` (None: it
    does not say) lists it in its place, ``shard_id``."""
    if listed_as is not None and listed_as != shard_id:
        raise ShardListError(
            f"this address serves shard {shard_id} of {num_shards}, but it is listed as shard "
            f"{listed_as}: check the order of the addresses, and the ids the shards were "
            "started with"
        )


class ParameterShard(ShardVectorOps, ShardCheckpoints):
    """One shard's slice of the model and its server-side optimizer.

    The shard starts empty and adopts the layout and initial values of the first worker that
    initialises it, so every replica starts from the model's own initial parameters.

    Args:
        shard_id: This shard's index in ``[0, num_shards)``.
        num_shards: How many shards hold the model.
        optimizer_factory: Builds the update rule over this shard's slice tensors.
        consistency: Async (default), SSP, or synchronous rounds.
        partitioner: Which slices this shard owns (default: byte-balanced flat); clients
            must use an equal one.
        num_workers: The job's workers: how many gradients a synchronous round expects.
        model_specs: The parameters of the model the shard serves for, where it knows it (a
            ``ParameterServer``'s): a client whose layout does not fit them is refused before
            the shard holds any (``check_layout``). Default: any layout is adopted.

    Raises:
        ValueError: ``num_shards`` or ``num_workers`` is no integer >= 1, or ``shard_id`` no
            integer in ``[0, num_shards)`` (a bool is no integer), naming which.
        TypeError: ``optimizer_factory`` is not callable, or ``consistency`` not a
            ConsistencyConfig.
    """

    def __init__(
        self,
        shard_id: int,
        num_shards: int,
        optimizer_factory: ServerOptimizerFactory,
        consistency: ConsistencyConfig | None = None,
        *,
        partitioner: Partitioner | None = None,
        num_workers: int = 1,
        model_specs: Sequence[TensorSpec] | None = None,
    ) -> None:
        check_count("num_shards", num_shards)
        check_count("shard_id", shard_id, least=0)
        check_count("num_workers", num_workers)
        if shard_id >= num_shards:
            raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
        if not callable(optimizer_factory):
            raise TypeError(
                "optimizer_factory must build the update rule (server_optimizer_factory(...)), "
                f"got {optimizer_factory!r}"
            )
        if consistency is not None and not isinstance(consistency, ConsistencyConfig):
            raise TypeError(f"consistency must be a ConsistencyConfig, got {consistency!r}")
        consistency = consistency or ConsistencyConfig()
        if not 0 <= consistency.backup_workers < num_workers:
            raise ValueError(
                f"backup_workers must be < num_workers ({num_workers}), "
                f"got {consistency.backup_workers}"
            )
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.consistency = consistency
        self.num_workers = num_workers
        self.partitioner: Partitioner = partitioner or FlatPartitioner()
        self.model_specs = None if model_specs is None else list(model_specs)
        self._optimizer_factory = optimizer_factory
        self._changed = threading.Condition(threading.Lock())
        self.group = ""
        """The parameter group this shard holds (named in refusals; "" the default group)."""
        self.specs: list[TensorSpec] = []
        self.fingerprint = ""
        self.slices: list[ShardSlice] = []
        self.store: ShardStore | None = None
        self._version = 0
        # Bumped on every change of the parameters (updates, init, restore): a pull whose
        # buffers already hold the current generation needs no copy.
        self._generation = 0
        self.changes = ChangeLog()
        """Which elements changed since a generation (pulls of changes only)."""
        self._keeps_support = False  # whether an update moves only its gradient's nonzeros
        self._sparse_push = False  # whether the push being applied travelled top-k
        self._num_pushes = 0
        self._num_pulls = 0
        self._num_dropped = 0
        self._restored_version = 0
        self.clocks = WorkerClocks(self.consistency.liveness_timeout_s)
        self.presence = WorkerPresence()
        """Which workers have a connection open (the service reports them)."""
        self.policy = consistency_policy(self.consistency, self.clocks, num_workers)
        self._scales = not consistency.sync and consistency.staleness_policy == "scale"
        self.staleness = StalenessHistogram()
        self.life = secrets.token_hex(8)
        """Names this shard's process life: a restarted shard (its vectors those of a
        checkpoint) answers vector programs with another one."""
        self.durability = ShardDurability(self.life)
        """Checkpoint numbers for the clients' replay of what a restart loses."""
        self.last_push: dict[str, tuple[int, int, int, int]] = {}
        """Per client session: (sequence number, version after, epoch, divisor) of its last
        push, to answer a retry of it again."""
        self.pushed_steps: dict[str, int] = {}
        """Worker id -> the step (clock) of its last push this life took: a worker restarted
        after a death goes on after it (not saved: a restored shard knows none)."""
        self.accumulator = EvaluationAccumulator()
        """The open Sandblaster evaluation's staged and committed gradient bundles."""
        self._last_program: dict[str, tuple[int, list]] = {}
        """Per client session: (sequence number, results) of its last vector program."""
        self._shared: SharedTensors | None = None
        """The parameters in memory clients on this host read directly (made on first ask)."""

    @property
    def initialized(self) -> bool:
        """Whether the shard holds parameters (from a worker's first handshake or a
        checkpoint)."""
        return self.store is not None

    @property
    def version(self) -> int:
        """Updates applied so far (a checkpoint's count included)."""
        return self._version

    def counters(self) -> ShardCounters:
        """The version, and the pushes, pulls and pushes dropped (not applied) so far."""
        return ShardCounters(self._version, self._num_pushes, self._num_pulls, self._num_dropped)

    def check_layout(self, specs: Sequence[TensorSpec]) -> None:
        """Raise ModelMismatchError unless ``specs`` equal the layout this shard holds, or, before
        it holds one, fit its ``model_specs``: a replica of another model would otherwise set
        the layout and train a whole job whose parameters the server's model cannot take."""
        if self.initialized:
            if layout_fingerprint(specs) != self.fingerprint:
                raise ModelMismatchError(describe_mismatch(self.specs, specs, client=True))
            return
        misfit = None if self.model_specs is None else describe_misfit(self.model_specs, specs)
        if misfit is not None:
            raise ModelMismatchError(misfit)

    def check_partitioner(self, partitioner: Partitioner) -> None:
        """Raise LayoutMismatchError unless ``partitioner`` equals this shard's."""
        mine, theirs = describe_partitioner(self.partitioner), describe_partitioner(partitioner)
        if mine != theirs:
            raise LayoutMismatchError(
                f"shard {self.shard_id} divides the model with partitioner {mine}, the client "
                f"with {theirs}: every shard and client must use the same partitioner"
            )

    def initialize(
        self,
        specs: Sequence[TensorSpec],
        values: Sequence[torch.Tensor],
        names: Sequence[str] | None = None,
    ) -> bool:
        """Adopt ``specs`` and this shard's slices ``values`` (named ``names``, where the
        client says) unless already initialised.

        Returns:
            True if adopted; False if the shard already held an equal layout.

        Raises:
            ModelMismatchError: the shard holds a different layout.
            ValueError: ``values`` do not fit this shard's slices.
        """
        slices = self.partitioner.partition(specs, self.num_shards)[self.shard_id]
        check_slices(slices, values, "initial", names)
        with self._changed:
            self.check_layout(specs)
            if self.initialized:
                return False
            store = ShardStore(self._optimizer_factory, [v.detach().clone() for v in values])
            self._adopt(specs, slices, store)
            return True

    def _adopt(self, specs: Sequence[TensorSpec], slices: list[ShardSlice], store: ShardStore):
        """Hold ``store`` as this shard's buffers (under the lock)."""
        self.specs = list(specs)
        self.fingerprint = layout_fingerprint(specs)
        self.slices = slices
        self.store = store
        if self._shared is not None:
            self._shared.retire()
            self._shared = None
        self.policy.bind(store, self._apply_update)
        self._generation += 1
        self.changes = ChangeLog()
        self._keeps_support = keeps_support(store.optimizer)

    def touch(self, worker: str | None, clock: int) -> None:
        """Note that ``worker`` is alive at step ``clock``."""
        if worker is not None:
            with self._changed:
                self.clocks.touch(worker, clock)
                self._changed.notify_all()

    def arrive(self, worker: str) -> None:
        """A connection of ``worker`` opened (the service reports it)."""
        self.presence.arrive(worker)

    def leave(self, worker: str) -> None:
        """A connection of ``worker`` closed. Once its last one has, the worker has gone: it no
        longer holds others back (one connection of several closing, as when a worker
        reconnects and the old connection's end is seen late, leaves its clock as it was)."""
        if self.presence.leave(worker):
            with self._changed:
                self.clocks.depart(worker)
                self._changed.notify_all()

    def apply_gradient(self, grads: Sequence[torch.Tensor]) -> int:
        """Push one gradient (one tensor per slice) from an anonymous caller; returns the
        version after it."""
        return self.push(grads).version

    def push(
        self,
        grads: Sequence[torch.Tensor],
        *,
        worker: str | None = None,
        clock: int = 0,
        base_version: int | None = None,
        seq: tuple[str, int] | None = None,
        sparse: bool = False,
    ) -> PushResult:
        """Apply (async) or collect (sync) one pushed gradient, as the policy decides.

        Args:
            grads: One tensor per slice; may be modified in place.
            worker: Who pushed (for liveness, clocks, dc-asgd); None for anonymous callers.
            clock: The worker's step count.
            base_version: The shard version the gradient was computed from (sync: the round).
            seq: (session, number) of the push: the session names one life of one client, the
                number counts its pushes. A push seen before (a retry after a lost reply) is
                answered again without being applied twice.
            sparse: The gradient travelled top-k (mostly zeros): worth recording which
                elements it changes, for pulls of changes only.
        """
        self.require_initialized()
        with self._changed:
            if worker is not None:
                self.clocks.touch(worker, clock)
            dedupe_key = f"{worker}#{seq[0]}" if worker is not None and seq else None
            last = self.last_push.get(dedupe_key) if dedupe_key else None
            if seq is not None and last is not None and seq[1] <= last[0]:
                return PushResult(
                    last[1],
                    0,
                    True,
                    last[2],
                    last[3],
                    durable=self.durability.describe(),
                    duplicate=True,
                )
            base = self._version if base_version is None else base_version
            staleness = max(0, self._version - base)
            self.staleness.record(staleness)
            self._num_pushes += 1
            self._sparse_push = sparse
            try:
                applied = self.policy.push(
                    grads,
                    worker=worker,
                    staleness=staleness,
                    base_version=base,
                    version=self._version,
                )
            finally:
                self._sparse_push = False
            if not applied:
                self._num_dropped += 1
            divisor = staleness if self._scales and staleness > 1 else 1
            result = PushResult(
                self._version,
                staleness,
                applied,
                self.durability.taken,
                divisor,
                durable=self.durability.describe(),
            )
            if dedupe_key is not None and seq is not None:
                remember(
                    self.last_push, dedupe_key, (seq[1], result.version, result.epoch, divisor)
                )
            if worker is not None:
                remember(self.pushed_steps, worker, clock)
            self._changed.notify_all()
            return result

    def replay(
        self,
        grads: Sequence[torch.Tensor],
        *,
        worker: str,
        seq: tuple[str, int],
        count: int,
        resent: int = 0,
        seen_version: int = 0,
    ) -> PushResult:
        """Apply a client's replay: the sum of its ``count`` pushes that this life's checkpoint
        does not hold, as one optimizer step worth ``count`` updates (no staleness adjustment:
        the sum is of what was applied). ``count`` 0 (no ``grads``) only reports ``resent``
        and ``seen_version`` for the lost-update count: all a client sends under synchronous
        rounds. Numbered as a push is: applied once.

        Raises:
            ValueError: this shard keeps no checkpoint numbers, or runs synchronous rounds
                and ``count`` is not 0 (a round's averaged update is no client's to replay).
        """
        self.require_initialized()
        if not self.durability.tracking:
            raise ValueError(
                f"shard {self.shard_id} takes no replays (it saves no periodic checkpoints)"
            )
        if self.consistency.sync and count:
            raise ValueError(
                f"shard {self.shard_id} takes no replays of updates (it runs synchronous "
                "rounds): only a report of the version seen"
            )
        if count < 0 or bool(grads) != (count > 0):
            raise ValueError(
                f"a replay of {count} updates must carry gradients exactly when it is worth any"
            )
        with self._changed:
            dedupe_key = f"{worker}#{seq[0]}"
            last = self.last_push.get(dedupe_key)
            if last is not None and seq[1] <= last[0]:
                durable = self.durability.describe()
                return PushResult(last[1], 0, True, last[2], durable=durable, duplicate=True)
            if count:
                assert self.store is not None
                with self._writing():
                    self.store.step(grads)
                    self._version += count
                self._generation += 1
            self.durability.note_replay(count, resent, seen_version)
            remember(self.last_push, dedupe_key, (seq[1], self._version, self.durability.taken, 1))
            self._changed.notify_all()
            return PushResult(
                self._version, 0, True, self.durability.taken, durable=self.durability.describe()
            )

    def _apply_update(self, grads: Sequence[torch.Tensor]) -> None:
        """The policy's way to update the parameters (called under the lock)."""
        assert self.store is not None
        support = None
        if self._keeps_support and self._sparse_push:
            support = self.changes.support(grads)
        with self._writing():
            self.store.step(grads)
            self._version += 1
        self._generation += 1
        self.changes.record(self._generation, support)

    def pull_into(
        self,
        outs: Sequence[torch.Tensor],
        *,
        worker: str | None = None,
        clock: int = 0,
        after_version: int | None = None,
        max_wait_s: float = 0.0,
        outs_generation: int | None = None,
        changes_since: int | None = None,
        max_changed: int = 0,
    ) -> PullResult:
        """Copy a consistent snapshot into ``outs`` once the consistency policy allows it.

        A pull is held while its worker is too far ahead (SSP) or, with ``after_version``,
        until the shard's version passes it (sync rounds). After ``max_wait_s`` it returns
        ``held=True`` with ``outs`` untouched, and the caller asks again. ``outs_generation``:
        the ``generation`` of an earlier result whose copy ``outs`` still hold; if the
        parameters have not changed since, the copy is skipped. ``changes_since``: the
        generation of an earlier result the caller holds; when at most ``max_changed``
        elements changed since, the result carries them (``changes``) and ``outs`` are left
        (-1: the caller holds nothing yet, but will ask for changes later).
        """
        self.require_initialized()
        deadline = time.monotonic() + max_wait_s
        with self._changed:
            if worker is not None:
                self.clocks.touch(worker, clock)
            while self.policy.must_hold(worker, after_version, self._version):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return PullResult(self._version, held=True)
                # Short waits: liveness changes by the clock, not only by notifications.
                self._changed.wait(min(remaining, 0.1))
            assert self.store is not None
            changes = None
            if changes_since is not None:
                changes = self._changes_since(changes_since, max_changed)
            if changes is None and outs_generation != self._generation:
                torch._foreach_copy_(list(outs), self.store.params)
            if self.policy.tracks_pulls:
                self.policy.pulled(worker, self._generation)
            self._num_pulls += 1
            return PullResult(
                self._version,
                held=False,
                generation=self._generation,
                durable=self.durability.describe(),
                changes=changes,
            )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Around every change of the parameters (under the lock): readers of the shared
        parameters copy again if one happened while they copied."""
        shared = self._shared
        if shared is None:
            yield
            return
        shared.begin_write()
        try:
            yield
        finally:
            shared.end_write(self._version)

    def share_parameters(self) -> SharedTensors | str:
        """The parameters in memory that clients on this host may map and read without a
        request (``wire/shared_params.py``), moved there on the first call; or why not."""
        self.require_initialized()
        with self._changed:
            if self._shared is not None:
                return self._shared
            if not self.policy.pulls_are_plain:
                return "its consistency model decides when each pull is answered"
            refused = sharing_supported()
            if refused is not None:
                return refused
            assert self.store is not None
            try:
                self._shared = SharedTensors(self.store.params, self._version)
            except OSError as e:
                return f"no memory to share its parameters ({e.strerror or e})"
            return self._shared

    @property
    def adjusts_gradients(self) -> bool:
        """Whether a pushed gradient is changed before it is applied (divided by its
        staleness, or compensated for it), in place."""
        return not self.consistency.sync and self.consistency.staleness_policy != "none"

    def note_direct_reads(self, count: int) -> None:
        """A client read the shared parameters ``count`` times since it last said so."""
        with self._changed:
            self._num_pulls += count

    def _changes_since(self, since: int, max_changed: int) -> list | None:
        """(indices, values) per slice of what changed after generation ``since``, if known
        and at most ``max_changed`` elements (under the lock)."""
        assert self.store is not None
        sizes = [piece.numel for piece in self.slices]
        changed = self.changes.changed_since(since, self._generation, sizes)
        if changed is None or sum(indices.numel() for indices in changed) > max_changed:
            return None
        return [
            (indices, param.index_select(0, indices))
            for indices, param in zip(changed, self.store.params, strict=True)
        ]

    def read_into(self, outs: Sequence[torch.Tensor]) -> int:
        """Copy a consistent snapshot of the slices into ``outs`` now; returns its version."""
        return self.pull_into(outs).version

    def parameters(self) -> list[torch.Tensor]:
        """Copies of the current slice values."""
        self.require_initialized()
        assert self.store is not None
        outs = [torch.empty_like(p) for p in self.store.params]
        self.read_into(outs)
        return outs

    def require_initialized(self) -> None:
        """Raises ShardEmptyError (a ValueError) unless the shard holds parameters."""
        if not self.initialized:
            of_group = f" of parameter group {self.group!r}" if self.group else ""
            raise ShardEmptyError(
                f"shard {self.shard_id} holds no parameters{of_group}: no worker has initialised "
                "it, or it was restarted with no checkpoint to restore from and what it held is "
                "lost (distbelief ps --checkpoint-dir DIR keeps it across restarts)"
            )
