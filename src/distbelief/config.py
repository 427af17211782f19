"""Config sections that more than one process reads (low in the import graph: every process
imports it, it imports nothing of distbelief's). One dataclass per concern, one docstring and one
default per field; ``__post_init__`` names the field and the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass

STALENESS_POLICIES = ("none", "scale", "dc-asgd")


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsistencyConfig:
    """A shard's consistency model. Workers learn it from the shard at their handshake."""

    sync: bool = False
    """Synchronous rounds: one aggregated update per step (Chen et al. 2016)."""
    num_workers: int = 1
    """Workers expected in a synchronous round."""
    backup_workers: int = 0
    """A round is applied after the first num_workers - backup_workers gradients."""
    max_staleness: int | None = None
    """Stale synchronous parallel: hold a worker's pull while it is more than this many steps
    ahead of the slowest live worker (Ho et al. 2013). None: no bound."""
    staleness_policy: str = "none"
    """How a stale gradient is adjusted: none, scale (Zhang et al. 2016), dc-asgd (Zheng et al.
    2017)."""
    dc_lambda: float = 0.04
    """Variance-control factor lambda of DC-ASGD (constant variant)."""
    liveness_timeout_s: float = 10.0
    """A worker not heard from for this long no longer holds others back."""
    apply_worker_lr: bool = False
    """Workers push updates already scaled by the learning rate of each step (the seed's
    ParameterServer), which the shard adds (its optimizer is SGD with rate 1), so each worker's
    own rate and LR scheduler decide the step size."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if not 0 <= self.backup_workers < self.num_workers:
            raise ValueError(
                f"backup_workers must be in [0, num_workers={self.num_workers}), "
                f"got {self.backup_workers}"
            )
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.staleness_policy not in STALENESS_POLICIES:
            raise ValueError(
                f"staleness_policy must be one of {STALENESS_POLICIES}, "
                f"got {self.staleness_policy!r}"
            )
        if self.sync and (self.max_staleness is not None or self.staleness_policy != "none"):
            raise ValueError("sync rounds have no staleness: drop max_staleness/staleness_policy")
        if self.apply_worker_lr and self.staleness_policy == "dc-asgd":
            # DC-ASGD's correction g*g*(w_now - w_fetched) assumes a raw gradient.
            raise ValueError("staleness_policy 'dc-asgd' needs raw gradients: not apply_worker_lr")
        if self.liveness_timeout_s <= 0:
            raise ValueError(f"liveness_timeout_s must be > 0, got {self.liveness_timeout_s}")

    def describe(self) -> dict:
        """The part of the config workers need (sent in the handshake reply)."""
        return {
            "sync": self.sync,
            "max_staleness": self.max_staleness,
            "apply_worker_lr": self.apply_worker_lr,
        }
