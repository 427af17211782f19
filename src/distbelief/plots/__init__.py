"""PNG plots of runs: one run folder's (``plot_run``) and a comparison of several
(``plot_runs``). Names load on first use, so importing this package does not import matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "plot_run": "distbelief.plots.run",
    "load_run": "distbelief.plots.run",
    "RunData": "distbelief.plots.run",
    "total_rate": "distbelief.plots.run",
    "run_title": "distbelief.plots.run",
    "plot_runs": "distbelief.plots.compare",
    "run_labels": "distbelief.plots.compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distbelief.plots' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
