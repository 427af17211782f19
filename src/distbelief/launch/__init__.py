"""Starting jobs: the ``distbelief`` command, the Cluster interface and its local processes,
``train``, which runs a job on a cluster, ``draw_plots``, which draws a run folder's plots
as a job's end does (a plot that cannot be drawn is logged, not raised), and
``run_dir_locked``, which holds a run folder for one job at a time. Names load on first
use: the command's ``--help`` imports none of torch, matplotlib, TensorBoard or rich.
"""

from __future__ import annotations

from distbelief.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "train": "distbelief.launch.job",
    "RunResult": "distbelief.launch.summary",
    "draw_plots": "distbelief.launch.run_records",
    "run_dir_locked": "distbelief.launch.run_lock",
    "Cluster": "distbelief.launch.cluster",
    "Fault": "distbelief.launch.cluster",
    "ProcessKind": "distbelief.launch.cluster",
    "ProcessSpec": "distbelief.launch.cluster",
    "RESTART_POLICIES": "distbelief.launch.cluster",
    "LocalCluster": "distbelief.launch.local",
    "RayCluster": "distbelief.launch.ray_cluster",
    "reshard_run": "distbelief.launch.reshard",
    "ReshardSummary": "distbelief.launch.reshard",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
