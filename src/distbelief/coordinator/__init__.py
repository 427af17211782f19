"""The coordinator process of Sandblaster L-BFGS: it hands out portions of each evaluation's
batch to workers, commits the gradient bundles they push to the shards, and keeps only scalars
(losses, dot products); every vector lives on the shards. Names load on first use.
"""

from __future__ import annotations

from distbelief.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "BatchPlan": "distbelief.coordinator.batch",
    "EvaluationFigures": "distbelief.coordinator.portions",
    "EvaluationOutcome": "distbelief.coordinator.portions",
    "PortionScheduler": "distbelief.coordinator.portions",
    "CoordinatorService": "distbelief.coordinator.service",
    "LBFGSSettings": "distbelief.coordinator.lbfgs",
    "SandblasterLBFGS": "distbelief.coordinator.lbfgs",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
