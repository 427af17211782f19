"""Which elements of a shard's slices changed since a generation: what lets a pull carry only
the changed elements (``wire/compression.py``'s sparse encoding) to a worker that still holds
an earlier pull's values.

The shard bumps its generation on every change of the parameters. An update whose effect is
confined to its gradient's nonzero elements (plain SGD, Adagrad: a zero gradient moves neither
the element nor its state) is recorded element by element; any other change (momentum, Adam,
a replay, a vector program, a restore) marks every element changed, and so does a generation
bump the log was not told of (it notices the gap). The log costs nothing until a pull first
asks for changes: then it holds one int32 per element (the generation, relative to a base, at
which it last changed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distbelief.server.optimizers import (
    PlainSGD,
    ServerAdagrad,
    ServerMomentumSGD,
    ServerOptimizer,
)

_MAX_OFFSET = torch.iinfo(torch.int32).max - 1

SPARSE_RECORD_FRACTION = 0.25
"""An update touching more than this fraction of the elements is recorded as touching all:
such a pull would not be sent sparse anyway, and one mark costs nothing."""


def keeps_support(optimizer: ServerOptimizer) -> bool:
    """Whether ``optimizer``'s step leaves every element whose gradient is zero (and its state)
    exactly as it was: plain SGD and Adagrad without weight decay or momentum."""
    if len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    if type(optimizer) in (torch.optim.SGD, ServerMomentumSGD, PlainSGD):
        return not (group["momentum"] or group["weight_decay"])
    if type(optimizer) in (torch.optim.Adagrad, ServerAdagrad):
        return not group["weight_decay"]
    return False


class ChangeLog:
    """Per element of a shard's slices, the generation of its last change (see the module)."""

    def __init__(self) -> None:
        self._at: list[torch.Tensor] | None = None
        self._base = 0  # generations are stored as offsets from this
        self._all_changed_at = 0
        self._generation = 0  # the last generation the log was told of

    @property
    def active(self) -> bool:
        """Whether a pull has asked for changes (updates are recorded element by element)."""
        return self._at is not None

    def support(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The nonzero elements of ``grads`` (one index tensor per slice) while the log is
        active and they are few enough to record one by one; else None (all change)."""
        if self._at is None:
            return None
        numel = sum(grad.numel() for grad in grads)
        support = [grad.nonzero().view(-1) for grad in grads]
        if sum(indices.numel() for indices in support) > SPARSE_RECORD_FRACTION * numel:
            return None
        return support

    def record(self, generation: int, support: Sequence[torch.Tensor] | None) -> None:
        """The parameters changed to ``generation``: only at ``support`` (per slice), or
        everywhere (None)."""
        if self._at is None or support is None or generation - self._base > _MAX_OFFSET:
            self._all_changed_at = self._generation = generation
            return
        if self._generation != generation - 1:
            self._all_changed_at = generation - 1  # changes in between were not told of
        offset = generation - self._base
        for at, indices in zip(self._at, support, strict=True):
            at.index_fill_(0, indices, offset)
        self._generation = generation

    def changed_since(
        self, since: int, generation: int, sizes: Sequence[int]
    ) -> list[torch.Tensor] | None:
        """Per slice, the indices of the elements that changed after ``since`` up to
        ``generation`` (the shard's now); None when that is unknown (everything may have).
        The first call activates the log for slices of ``sizes``."""
        if self._at is None or generation - self._base > _MAX_OFFSET:
            self._at = [torch.zeros(size, dtype=torch.int32) for size in sizes]
            self._base = self._all_changed_at = self._generation = generation
            return None
        if self._generation != generation:
            self._all_changed_at = self._generation = generation
        if not self._all_changed_at <= since <= generation:
            return None
        offset = since - self._base
        return [(at > offset).nonzero().view(-1) for at in self._at]
