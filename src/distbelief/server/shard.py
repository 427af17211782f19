"""ParameterShard: the authoritative values of one shard's slice of every parameter.

Pure state and math: no sockets. Updates are applied one at a time under a lock (no lost
updates); a pull copies a consistent snapshot under the same lock. The consistency model
(async, SSP, sync rounds) decides when a push is applied and when a pull may be answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distbelief.config import ConsistencyConfig
from distbelief.errors import ModelMismatchError
from distbelief.server.consistency import WorkerClocks
from distbelief.server.optimizers import ServerOptimizerFactory, apply_update
from distbelief.server.staleness import StalenessHistogram, adjust_gradient
from distbelief.sharding import (
    ShardSlice,
    TensorSpec,
    describe_mismatch,
    layout_fingerprint,
    partition,
)


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
    """False when a synchronous round closed before this gradient arrived (a late backup)."""


@dataclass(frozen=True, slots=True)
class PullResult:
    version: int
    held: bool
    """True when the pull had to wait longer than allowed and carries no parameters."""
    generation: int = 0
    """Names the parameter values copied out (see ``pull_into``'s ``outs_generation``)."""


@dataclass(kw_only=True, slots=True)
class ShardState:
    """Everything that survives a shard restart: what a checkpoint holds."""

    shard_id: int
    num_shards: int
    specs: list[TensorSpec]
    params: list[torch.Tensor]
    optimizer_name: str
    optimizer_state: dict[int, dict[str, object]]
    """torch.optim state per parameter index (tensors and plain values)."""
    version: int
    num_pushes: int
    last_push: dict[str, tuple[int, int]]


class ParameterShard:
    """One shard's slice of the model and its server-side optimizer.

    The shard starts empty and adopts the layout and initial values of the first worker that
    initialises it, so every replica starts from the model's own initial parameters.

    Args:
        shard_id: This shard's index in ``[0, num_shards)``.
        num_shards: How many shards hold the model.
        optimizer_factory: Builds the update rule over this shard's slice tensors.
        consistency: Async (default), SSP, or synchronous rounds.
        num_workers: The job's workers: how many gradients a synchronous round expects.
    """

    def __init__(
        self,
        shard_id: int,
        num_shards: int,
        optimizer_factory: ServerOptimizerFactory,
        consistency: ConsistencyConfig | None = None,
        *,
        num_workers: int = 1,
    ) -> None:
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
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
        self._optimizer_factory = optimizer_factory
        self._changed = threading.Condition(threading.Lock())
        self.specs: list[TensorSpec] = []
        self.fingerprint = ""
        self.slices: list[ShardSlice] = []
        self._params: list[torch.Tensor] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._version = 0
        # Bumped on every change of the parameters (updates, init, restore): a pull whose
        # buffers already hold the current generation needs no copy.
        self._generation = 0
        self._num_pushes = 0
        self._num_pulls = 0
        self._num_dropped = 0
        self.clocks = WorkerClocks(self.consistency.liveness_timeout_s)
        self.staleness = StalenessHistogram()
        self._round_sum: list[torch.Tensor] = []
        self._round_count = 0
        self._started_s = time.monotonic()
        self.last_push: dict[str, tuple[int, int]] = {}
        """Per client session: (sequence number, version after) of its last push."""

    @property
    def initialized(self) -> bool:
        return self._optimizer is not None

    @property
    def version(self) -> int:
        return self._version

    def counters(self) -> ShardCounters:
        return ShardCounters(self._version, self._num_pushes, self._num_pulls, self._num_dropped)

    def check_layout(self, specs: Sequence[TensorSpec]) -> None:
        """Raise ModelMismatchError unless ``specs`` equal the layout this shard holds."""
        if self.initialized and layout_fingerprint(specs) != self.fingerprint:
            raise ModelMismatchError(describe_mismatch(self.specs, specs))

    def initialize(self, specs: Sequence[TensorSpec], values: Sequence[torch.Tensor]) -> bool:
        """Adopt ``specs`` and this shard's slices ``values`` unless already initialised.

        Returns:
            True if adopted; False if the shard already held an equal layout.

        Raises:
            ModelMismatchError: the shard holds a different layout.
            ValueError: ``values`` do not fit this shard's slices.
        """
        slices = partition(specs, self.num_shards)[self.shard_id]
        if len(values) != len(slices):
            raise ValueError(f"expected {len(slices)} initial slices, got {len(values)}")
        for piece, value in zip(slices, values, strict=True):
            if value.dtype != piece.dtype or value.shape != (piece.numel,):
                raise ValueError(f"initial value for {piece.name} has {value.dtype} {value.shape}")
        with self._changed:
            if self.initialized:
                self.check_layout(specs)
                return False
            self.specs = list(specs)
            self.fingerprint = layout_fingerprint(specs)
            self.slices = slices
            self._params = [value.detach().clone() for value in values]
            self._optimizer = self._optimizer_factory(self._params)
            self._round_sum = [torch.zeros_like(p) for p in self._params]
            self._generation += 1
            return True

    def touch(self, worker: str | None, clock: int) -> None:
        """Note that ``worker`` is alive at step ``clock``."""
        if worker is not None:
            with self._changed:
                self.clocks.touch(worker, clock)
                self._changed.notify_all()

    def depart(self, worker: str) -> None:
        """``worker`` has gone (closed its connection); it no longer holds others back."""
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
        fetched: Sequence[torch.Tensor] | None = None,
        seq: tuple[str, int] | None = None,
    ) -> PushResult:
        """Apply (async) or collect (sync) one pushed gradient.

        Args:
            grads: One tensor per slice; may be modified in place.
            worker: Who pushed (for liveness and clocks); None for anonymous callers.
            clock: The worker's step count.
            base_version: The shard version the gradient was computed from (sync: the round).
            fetched: The parameters this shard last sent to ``worker`` (for dc-asgd).
            seq: (session, number) of the push: the session names one life of one client, the
                number counts its pushes. A push seen before (a retry after a lost reply) is
                answered again without being applied twice.
        """
        self.require_initialized()
        with self._changed:
            if worker is not None:
                self.clocks.touch(worker, clock)
            dedupe_key = f"{worker}#{seq[0]}" if worker is not None and seq else None
            last = self.last_push.get(dedupe_key) if dedupe_key else None
            if seq is not None and last is not None and seq[1] <= last[0]:
                return PushResult(last[1], 0, True)
            base = self._version if base_version is None else base_version
            staleness = max(0, self._version - base)
            self.staleness.record(staleness)
            self._num_pushes += 1
            if self.consistency.sync:
                applied = self._collect_for_round(grads, base)
            else:
                self._apply(grads, staleness, fetched)
                applied = True
            if dedupe_key is not None and seq is not None:
                self.last_push[dedupe_key] = (seq[1], self._version)
            self._changed.notify_all()
            return PushResult(self._version, staleness, applied)

    def _apply(self, grads, staleness: int, fetched) -> None:
        config = self.consistency
        adjusted = adjust_gradient(
            config.staleness_policy,
            grads,
            staleness=staleness,
            params_now=self._params,
            params_fetched=fetched,
            dc_lambda=config.dc_lambda,
        )
        assert self._optimizer is not None
        apply_update(self._optimizer, self._params, adjusted)
        self._version += 1
        self._generation += 1

    def _round_quorum(self) -> int:
        config = self.consistency
        now_s = time.monotonic()
        dead = self.clocks.dead_count(now_s)
        if now_s - self._started_s > config.liveness_timeout_s:
            # Workers that never showed up within a liveness period count as dead too.
            dead += max(0, self.num_workers - len(self.clocks.workers))
        return max(1, self.num_workers - config.backup_workers - dead)

    def _collect_for_round(self, grads, round_id: int) -> bool:
        if round_id != self._version:
            self._num_dropped += 1  # a backup worker's late gradient: its round is closed
            return False
        torch._foreach_add_(self._round_sum, list(grads))
        self._round_count += 1
        self._close_round_if_complete()
        return True

    def _close_round_if_complete(self) -> bool:
        """Apply the mean of the round's gradients once enough workers have pushed."""
        if not self._round_count or self._round_count < self._round_quorum():
            return False
        torch._foreach_div_(self._round_sum, float(self._round_count))
        self._apply(self._round_sum, 0, None)
        torch._foreach_zero_(self._round_sum)
        self._round_count = 0
        return True

    def _must_hold(self, worker: str | None, after_version: int | None) -> bool:
        config = self.consistency
        if (
            worker is not None
            and config.max_staleness is not None
            and self.clocks.too_far_ahead(worker, config.max_staleness)
        ):
            return True
        if after_version is not None and self._version <= after_version:
            # Sync: the round this worker pushed into is not applied yet. Re-check the quorum,
            # which shrinks when a worker dies.
            return not self._close_round_if_complete()
        return False

    def pull_into(
        self,
        outs: Sequence[torch.Tensor],
        *,
        worker: str | None = None,
        clock: int = 0,
        after_version: int | None = None,
        max_wait_s: float = 0.0,
        outs_generation: int | None = None,
    ) -> PullResult:
        """Copy a consistent snapshot into ``outs`` once the consistency model allows it.

        A pull is held while its worker is too far ahead (SSP) or, with ``after_version``,
        until the shard's version passes it (sync rounds). After ``max_wait_s`` it returns
        ``held=True`` with ``outs`` untouched, and the caller asks again. ``outs_generation``:
        the ``generation`` of an earlier result whose copy ``outs`` still hold; if the
        parameters have not changed since, the copy is skipped.
        """
        self.require_initialized()
        deadline = time.monotonic() + max_wait_s
        with self._changed:
            if worker is not None:
                self.clocks.touch(worker, clock)
            while self._must_hold(worker, after_version):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return PullResult(self._version, held=True)
                # Short waits: liveness changes by the clock, not only by notifications.
                self._changed.wait(min(remaining, 0.1))
            if outs_generation != self._generation:
                torch._foreach_copy_(list(outs), self._params)
            self._num_pulls += 1
            return PullResult(self._version, held=False, generation=self._generation)

    def read_into(self, outs: Sequence[torch.Tensor]) -> int:
        """Copy a consistent snapshot of the slices into ``outs`` now; returns its version."""
        return self.pull_into(outs).version

    def parameters(self) -> list[torch.Tensor]:
        """Copies of the current slice values."""
        outs = [torch.empty_like(p) for p in self._params]
        self.read_into(outs)
        return outs

    def snapshot(self) -> ShardState:
        """A consistent copy of everything a checkpoint needs (taken under the lock)."""
        self.require_initialized()
        with self._changed:
            assert self._optimizer is not None
            optimizer_state = self._optimizer.state_dict()
            return ShardState(
                shard_id=self.shard_id,
                num_shards=self.num_shards,
                specs=list(self.specs),
                params=[p.clone() for p in self._params],
                optimizer_name=type(self._optimizer).__name__,
                optimizer_state={
                    index: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
                    for index, state in optimizer_state["state"].items()
                },
                version=self._version,
                num_pushes=self._num_pushes,
                last_push=dict(self.last_push),
            )

    def restore(self, state: ShardState) -> None:
        """Become the shard ``state`` describes (before serving anyone).

        Raises:
            ValueError: the state belongs to another shard, or to another optimizer.
        """
        if (state.shard_id, state.num_shards) != (self.shard_id, self.num_shards):
            raise ValueError(
                f"checkpoint is of shard {state.shard_id} of {state.num_shards}, "
                f"not shard {self.shard_id} of {self.num_shards}"
            )
        slices = partition(state.specs, self.num_shards)[self.shard_id]
        for piece, value in zip(slices, state.params, strict=True):
            if value.dtype != piece.dtype or value.shape != (piece.numel,):
                raise ValueError(f"checkpoint slice {piece.name} has {value.dtype} {value.shape}")
        optimizer = self._optimizer_factory([p.clone() for p in state.params])
        if type(optimizer).__name__ != state.optimizer_name:
            raise ValueError(
                f"checkpoint holds {state.optimizer_name} state, this shard runs "
                f"{type(optimizer).__name__}"
            )
        params = optimizer.param_groups[0]["params"]
        optimizer.load_state_dict(
            {"state": state.optimizer_state, "param_groups": optimizer.state_dict()["param_groups"]}
        )
        with self._changed:
            self.specs = list(state.specs)
            self.fingerprint = layout_fingerprint(state.specs)
            self.slices = slices
            self._params = list(params)
            self._optimizer = optimizer
            self._round_sum = [torch.zeros_like(p) for p in self._params]
            self._version = state.version
            self._generation += 1
            self._num_pushes = state.num_pushes
            self.last_push = dict(state.last_push)

    def require_initialized(self) -> None:
        if not self.initialized:
            raise ValueError(f"shard {self.shard_id} has no parameters yet: a worker must init it")
