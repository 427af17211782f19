"""Per-step hooks of the worker loop: what a hook is told after each step, and what it may do
(slow the worker down, stop it early, collect data). Hooks only observe; the loop owns training."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, kw_only=True, slots=True)
class StepInfo:
    """One finished step of a worker."""

    step: int
    """The optimizer's step count after this step (a restarted worker counts on from where its
    previous life stopped)."""
    loss: float
    """Mean loss of this step's batch (cross-entropy; binary cross-entropy for clicks)."""
    batch_size: int
    """Samples in this step's batch."""
    compute_s: float
    """Seconds of zero_grad, forward, backward and optimizer step (the push and pull of this
    step included when they block)."""
    time: float
    """``time.time()`` when the step finished."""


@runtime_checkable
class StepHook(Protocol):
    """Called after every step of the worker loop, in the order the hooks were given."""

    def after_step(self, step: StepInfo) -> bool | None:
        """Sees one step; whatever it does (sleep, record) counts as the worker's time.

        Returns:
            True to stop the loop after this step (the worker then flushes and returns as if
            its batches had run out); None or False to go on.
        """


def after_step(
    hooks: Sequence[StepHook], *, step: int, loss: float, batch_size: int, compute_s: float
) -> bool:
    """Tells every hook about a finished step; True if one asks the loop to stop. Every hook
    sees the step, even when an earlier one asks to stop."""
    info = StepInfo(
        step=step, loss=loss, batch_size=batch_size, compute_s=compute_s, time=time.time()
    )
    stops = [bool(hook.after_step(info)) for hook in hooks]
    return any(stops)
