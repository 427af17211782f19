"""The tables' part in a ``torch.amp.GradScaler``'d step: their gradient rows unscaled and
checked by the scaler itself, as it checks an optimizer's gradients, so that a step it skips for
an inf or NaN among them backs its scale off in ``update()`` as a skipped optimizer step does.
Knows nothing of shards or requests.
"""

from __future__ import annotations

import torch


class _RowGradients(torch.optim.Optimizer):
    """One step's gradient rows presented to a scaler as an optimizer's gradients; ``step()``
    only records that the scaler let the step run."""

    def __init__(self, rows: list[torch.Tensor]) -> None:
        # Stand-in parameters, of each gradient's shape but no memory (an expanded scalar):
        # the scaler reads and unscales only their ``.grad``.
        params = [torch.zeros((), dtype=grad.dtype).expand(grad.shape) for grad in rows]
        for param, grad in zip(params, rows, strict=True):
            param.grad = grad
        super().__init__(params, {})
        self.stepped = False

    def step(self, closure: object = None) -> None:
        self.stepped = True


def unscaled_rows(grad_scaler: torch.amp.GradScaler, gradients: dict) -> dict:
    """``gradients`` (table -> (ids, summed rows)) with the rows unscaled in place, or none if
    the scaler skips their step (an inf or NaN among them; a disabled scaler neither unscales
    nor skips).

    This relies on ``GradScaler.step(optimizer)`` alone, as torch documents it: it unscales the
    optimizer's ``.grad``s, calls its ``step()`` only if they are all finite, and records what
    it found for ``update()``, which backs the scale off if any optimizer's step was skipped.
    The rows, presented as an optimizer's gradients, are then one more optimizer to the
    scaler (the scaler's per-optimizer bookkeeping is not touched from here).
    """
    if not gradients:
        return gradients
    rows = _RowGradients([summed for _, summed in gradients.values()])
    grad_scaler.step(rows)
    return gradients if rows.stepped else {}
