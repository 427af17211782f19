"""Stale-gradient handling on a shard: the policies and the staleness histogram.

``scale`` divides a gradient by its staleness (Zhang et al. 2016). ``dc-asgd`` adds the delay
compensation of Zheng et al. 2017, ``g + lambda * g * g * (w_now - w_fetched)``, where
``w_fetched`` is the snapshot this shard last sent to the pushing worker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch


def adjust_gradient(
    policy: str,
    grads: Sequence[torch.Tensor],
    *,
    staleness: int,
    params_now: Sequence[torch.Tensor],
    params_fetched: Sequence[torch.Tensor] | None,
    dc_lambda: float,
) -> Sequence[torch.Tensor]:
    """The gradient to apply under ``policy`` (may be ``grads`` itself, modified in place)."""
    if policy == "scale" and staleness > 1:
        torch._foreach_div_(list(grads), float(staleness))
    elif policy == "dc-asgd" and params_fetched is not None:
        for grad, now, fetched in zip(grads, params_now, params_fetched, strict=True):
            # g += lambda * g * g * (w_now - w_fetched), elementwise.
            grad.addcmul_(grad * grad, now - fetched, value=dc_lambda)
    return grads


class StalenessHistogram:
    """Counts of pushes by staleness (updates applied between a worker's fetch and its push)."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def record(self, staleness: int) -> None:
        self.counts[staleness] += 1

    def as_dict(self) -> dict[str, int]:
        return {str(staleness): count for staleness, count in sorted(self.counts.items())}
