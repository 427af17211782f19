"""ParameterShard: the authoritative values of one shard's slice of every parameter.

Pure state and math: no sockets. Updates are applied one at a time under a lock (no lost
updates); a pull copies a consistent snapshot under the same lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distbelief.errors import ModelMismatchError
from distbelief.server.optimizers import ServerOptimizerFactory, apply_update
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


class ParameterShard:
    """One shard's slice of the model and its server-side optimizer.

    The shard starts empty and adopts the layout and initial values of the first worker that
    initialises it, so every replica starts from the model's own initial parameters.

    Args:
        shard_id: This shard's index in ``[0, num_shards)``.
        num_shards: How many shards hold the model.
        optimizer_factory: Builds the update rule over this shard's slice tensors.
    """

    def __init__(
        self, shard_id: int, num_shards: int, optimizer_factory: ServerOptimizerFactory
    ) -> None:
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
        self.shard_id = shard_id
        self.num_shards = num_shards
        self._optimizer_factory = optimizer_factory
        self._lock = threading.Lock()
        self.specs: list[TensorSpec] = []
        self.fingerprint = ""
        self.slices: list[ShardSlice] = []
        self._params: list[torch.Tensor] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._version = 0
        self._num_pushes = 0
        self._num_pulls = 0

    @property
    def initialized(self) -> bool:
        return self._optimizer is not None

    def counters(self) -> ShardCounters:
        return ShardCounters(self._version, self._num_pushes, self._num_pulls)

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
        for piece, value in zip(slices, values, strict=False):
            if value.dtype != piece.dtype or value.shape != (piece.numel,):
                raise ValueError(f"initial value for {piece.name} has {value.dtype} {value.shape}")
        if len(values) != len(slices):
            raise ValueError(f"expected {len(slices)} initial slices, got {len(values)}")
        with self._lock:
            if self.initialized:
                self.check_layout(specs)
                return False
            self.specs = list(specs)
            self.fingerprint = layout_fingerprint(specs)
            self.slices = slices
            self._params = [value.detach().clone() for value in values]
            self._optimizer = self._optimizer_factory(self._params)
            return True

    def apply_gradient(self, grads: Sequence[torch.Tensor]) -> int:
        """Apply one pushed gradient (one tensor per slice); returns the new version."""
        self.require_initialized()
        with self._lock:
            assert self._optimizer is not None
            apply_update(self._optimizer, self._params, grads)
            self._version += 1
            self._num_pushes += 1
            return self._version

    def read_into(self, outs: Sequence[torch.Tensor]) -> int:
        """Copy a consistent snapshot of the slices into ``outs``; returns its version."""
        self.require_initialized()
        with self._lock:
            torch._foreach_copy_(list(outs), self._params)
            self._num_pulls += 1
            return self._version

    def parameters(self) -> list[torch.Tensor]:
        """Copies of the current slice values."""
        outs = [torch.empty_like(p) for p in self._params]
        self.read_into(outs)
        return outs

    def require_initialized(self) -> None:
        if not self.initialized:
            raise ValueError(f"shard {self.shard_id} has no parameters yet: a worker must init it")
