"""A client's replay buffer for one shard: the sums of its pushes that the shard's checkpoints may
not hold yet, kept by checkpoint epoch, released as checkpoints reach disk, and handed back once
for re-sending when the shard restarts from a checkpoint that lacks them.

The shard's replies describe its checkpoints (``server/durability.py``): a push of epoch ``e`` is
in checkpoint ``n`` exactly when ``e < n``. While checkpoints succeed at most two sums are held
(the epoch being saved and the current one). Pure bookkeeping: no wire, no locking (one shard's
lane uses it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Replay:
    """What to re-send to a shard that restarted."""

    tensors: list[torch.Tensor] | None
    """The sum of the pushes its checkpoint lacks, one tensor per slice (None: no push)."""
    count: int
    """How many pushes the sum holds (the updates it is worth)."""
    resent: int
    """Updates that were in flight when the restart was found (their retry re-applied them)."""
    seen_version: int
    """The highest version the shard's previous life answered with."""


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(slots=True)
class _Sum:
    tensors: list[torch.Tensor]
    count: int


class ShardReplay:
    """One shard's replay buffer (see the module docstring)."""

    def __init__(self) -> None:
        self.life: str | None = None
        self.saved = 0
        """The shard's last checkpoint on disk, as its last reply said."""
        self.seen_version = 0
        self.sums: dict[int, _Sum] = {}
        """Epoch -> the sum of this client's pushes applied in it (epochs >= ``saved``)."""

    @property
    def held(self) -> int:
        """Pushes held for replay."""
        return sum(s.count for s in self.sums.values())

    def observe(self, meta: dict, *, in_flight: int = 0) -> Replay | None:
        """Take in a reply's description of the shard's checkpoints (``meta["durable"]``).

        Args:
            meta: The reply's meta.
            in_flight: Updates the request carried that may have reached the previous life too
                (a push's 1; 0 for a pull), reported as re-sent if the shard restarted.

        Returns:
            None, or (the shard restarted since the last reply) what to re-send to it: the
            buffer then holds nothing of the previous life.
        """
        durable = meta.get("durable")
        if durable is None:
            return None
        life, saved = str(durable["life"]), int(durable["saved"])
        version = int(meta.get("version", 0))
        if self.life is None or life == self.life:
            self.life = life
            self.seen_version = max(self.seen_version, version)
            self._merge_void(durable.get("void", ()))
            self._release(saved)
            return None
        replay = self._take_from(int(durable["restored"]), in_flight)
        self.life, self.saved, self.seen_version = life, saved, version
        return replay

    def record(self, meta: dict, tensors: list[torch.Tensor], count: int = 1) -> None:
        """Add a push (or a replay worth ``count`` pushes) that the shard answered with ``meta``
        to its epoch's sum (after :meth:`observe` of the same reply). Scaled as the shard
        scaled it (``divisor``), so the sum is what was applied."""
        if meta.get("durable") is None or str(meta["durable"]["life"]) != self.life:
            return
        epoch = int(meta["epoch"])
        if epoch < self.saved:
            return  # on disk already (a retried push answered again)
        entry = self.sums.get(epoch)
        if entry is None:
            entry = self.sums[epoch] = _Sum(self._zeros_like(tensors), 0)
        divisor = int(meta.get("divisor", 1))
        torch._foreach_add_(entry.tensors, tensors, alpha=1.0 / divisor)
        entry.count += count

    @staticmethod
    def _zeros_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # Half-precision pushes are summed in float32: one rounding when re-sent, not one
        # per push. A new sum per checkpoint (not a reused one): between saves only one lives.
        return [torch.zeros_like(t, dtype=_sum_dtype(t.dtype)) for t in tensors]

    def _release(self, saved: int) -> None:
        """Forget the sums the shard's checkpoint ``saved`` holds (epochs below it)."""
        self.saved = max(self.saved, saved)
        for epoch in [e for e in self.sums if e < self.saved]:
            del self.sums[epoch]

    def _merge_void(self, void) -> None:
        """A failed checkpoint ``v`` is no restore point: epochs ``v - 1`` and ``v`` are one,
        so their sums merge (this keeps two sums while saves keep failing)."""
        for number in sorted(int(v) for v in void):
            below = self.sums.pop(number - 1, None)
            if below is None:
                continue
            entry = self.sums.get(number)
            if entry is None:
                self.sums[number] = below
                continue
            torch._foreach_add_(entry.tensors, below.tensors)
            entry.count += below.count

    def _take_from(self, restored: int, in_flight: int) -> Replay:
        """Empty the buffer: the sum of the epochs checkpoint ``restored`` lacks."""
        if restored < self.saved:
            logger.warning(
                "shard restarted from checkpoint %d, older than checkpoint %d it had saved: "
                "pushes of the epochs between are lost",
                restored,
                self.saved,
            )
        missing = [entry for epoch, entry in sorted(self.sums.items()) if epoch >= restored]
        self.sums = {}
        total = None
        count = 0
        for entry in missing:
            if total is None:
                total = entry.tensors
            else:
                torch._foreach_add_(total, entry.tensors)
            count += entry.count
        return Replay(total, count, in_flight, self.seen_version)
