"""What a ParameterShard's checkpoints hold (``ShardState``): taking a consistent snapshot,
restoring a shard from one (refusing another shard's, partitioner's or optimizer's), and the
durability figures of its periodic checkpoints. A mixin of ParameterShard: it writes no file
(``server/checkpoint.py`` does) and applies no update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distbelief.server.store import PARAM, ShardStore
from distbelief.server.vectors import EvaluationAccumulator
from distbelief.sharding import (
    ShardSlice,
    describe_partitioner,
    partitioner_from_json,
    specs_from_json,
    specs_to_json,
)


@dataclass(kw_only=True, slots=True)
class ShardState:
    """Everything that survives a shard restart: what a checkpoint holds."""

    shard_id: int
    num_shards: int
    version: int
    tensors: dict[str, torch.Tensor]
    """The store's persistent buffers and optimizer state, by name."""
    values: dict[str, object]
    """JSON-able: layout, partitioner, counters and the store's plain values."""


def _last_push_entry(saved: Sequence[int]) -> tuple[int, int, int, int]:
    """A checkpoint's last push of a session: (seq, version) before checkpoints were numbered,
    (seq, version, epoch, divisor) since."""
    entry = [int(value) for value in saved]
    seq, version, epoch, divisor = entry if len(entry) == 4 else [*entry, 0, 1]
    return seq, version, epoch, divisor


def check_slices(
    slices: Sequence[ShardSlice],
    values: Sequence[torch.Tensor],
    what: str,
    names: Sequence[str] | None = None,
    *,
    keys: Sequence[str] | None = None,
) -> None:
    """Raise ValueError unless ``values`` (named ``names``, where given) are ``slices``.
    ``keys``: what each value is called in the message (default: its slice's name)."""
    if len(values) != len(slices):
        raise ValueError(f"expected {len(slices)} {what} slices, got {len(values)}")
    if names is not None and list(names) != [piece.name for piece in slices]:
        expected = ", ".join(piece.name for piece in slices)
        raise ValueError(f"{what} slices are named {', '.join(names)}; this shard's: {expected}")
    for index, (piece, value) in enumerate(zip(slices, values, strict=True)):
        if value.dtype != piece.dtype or value.shape != (piece.numel,):
            if keys is None:
                raise ValueError(f"{what} slice {piece.name} has {value.dtype} {value.shape}")
            raise ValueError(
                f"tensor {keys[index]!r} is {value.dtype} {list(value.shape)}; its slice, "
                f"{piece.name}, is {piece.dtype} [{piece.numel}]"
            )


class ShardCheckpoints:
    """Snapshot and restore of a ParameterShard, on the attributes its constructor sets (the
    store, the layout, the versions, the last pushes and the durability tracker), under its
    lock ``_changed``."""

    def snapshot(self) -> ShardState:
        """A consistent copy of everything a checkpoint needs (taken under the lock); it begins
        checkpoint number ``values["checkpoint_number"]`` (see ``server/durability.py``)."""
        self.require_initialized()
        with self._changed:
            assert self.store is not None
            tensors, store_values = self.store.export()
            values = {
                "specs": specs_to_json(self.specs),
                "partitioner": self.partitioner.to_json(),
                "num_pushes": self._num_pushes,
                "last_push": {session: list(entry) for session, entry in self.last_push.items()},
                "store": store_values,
                "checkpoint_number": self.durability.begin(),
            }
            return ShardState(
                shard_id=self.shard_id,
                num_shards=self.num_shards,
                version=self._version,
                tensors=tensors,
                values=values,
            )

    def restore(self, state: ShardState) -> None:
        """Become the shard ``state`` describes (before serving anyone).

        Raises:
            ValueError: the state belongs to another shard, another partitioner or another
                optimizer, or is incomplete.
        """
        specs, slices, store, last_push, num_pushes, checkpoint = self._read_state(state)
        with self._changed:
            self._adopt(specs, slices, store)
            self._version = self._restored_version = state.version
            self._num_pushes = num_pushes
            self.last_push = last_push
            self.durability.start_from(checkpoint)
            self.accumulator = EvaluationAccumulator()
            self._last_program = {}

    def check_restores(self, state: ShardState) -> None:
        """Raise ValueError as :meth:`restore` would, unless it takes ``state``; changes
        nothing. Only the tensors' dtypes and shapes are read: they may be on the meta device
        (a checkpoint's, checked before a shard restores it)."""
        self._read_state(state)

    def _read_state(self, state: ShardState) -> tuple:
        """What :meth:`restore` adopts of ``state``: specs, slices, store, last pushes, push
        count and checkpoint number (ValueError as it says)."""
        if (state.shard_id, state.num_shards) != (self.shard_id, self.num_shards):
            raise ValueError(
                f"checkpoint is of shard {state.shard_id} of {state.num_shards}, "
                f"not shard {self.shard_id} of {self.num_shards}"
            )
        values = state.values
        try:
            specs = specs_from_json(values["specs"])
            saved = describe_partitioner(partitioner_from_json(values["partitioner"]))
            if saved != describe_partitioner(self.partitioner):
                raise ValueError(
                    f"checkpoint was partitioned with {saved}, this shard partitions with "
                    f"{describe_partitioner(self.partitioner)}"
                )
            slices = self.partitioner.partition(specs, self.num_shards)[self.shard_id]
            store = ShardStore.load(
                self._optimizer_factory,
                state.tensors,
                values["store"],
                # Every buffer holds a tensor per slice, shaped as it.
                check_buffer=lambda name, buffer, keys: check_slices(
                    slices,
                    buffer,
                    "checkpoint" if name == PARAM else f"checkpoint {name!r}",
                    keys=keys,
                ),
            )
            last_push = {s: _last_push_entry(p) for s, p in values["last_push"].items()}
            num_pushes = int(values["num_pushes"])
            checkpoint = int(values.get("checkpoint_number", 0))
        except (KeyError, TypeError) as e:
            raise ValueError(f"checkpoint state is incomplete: {e!r}") from e
        return specs, slices, store, last_push, num_pushes, checkpoint

    def describe_durability(self) -> dict | None:
        """``ShardDurability.describe()`` now (None: no periodic checkpoints)."""
        with self._changed:
            return self.durability.describe()

    def track_checkpoints(self) -> None:
        """Periodic checkpoints run: from now on replies say which pushes are on disk, so that
        clients can replay the rest after a restart. Under synchronous rounds too: a round's
        averaged update is no client's to replay, but a client that finds a restart reports
        the last version it saw of the life before (for the lost-update count)."""
        with self._changed:
            self.durability.tracking = True

    def recovery(self) -> dict:
        """What clients replayed into this life (``ShardDurability.recovery``);
        ``version_seen_before`` is at least the restored version."""
        with self._changed:
            figures = self.durability.recovery()
            figures["version_seen_before"] = max(
                figures["version_seen_before"], self._restored_version
            )
            return figures

    def checkpoint_finished(self, state: ShardState, saved: bool) -> None:
        """The checkpoint ``state`` began is on disk (``saved``), or its save failed."""
        with self._changed:
            self.durability.finish(int(state.values["checkpoint_number"]), saved)
