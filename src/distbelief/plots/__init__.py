"""PNG plots of runs: one run folder's (``plot_run``) and a comparison of several
(``plot_runs``). Names load on first use, so importing this package does not import matplotlib.
"""

from __future__ import annotations

from distbelief.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
