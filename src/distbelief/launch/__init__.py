"""Starting jobs: the ``distbelief`` command, the Cluster interface and its local processes,
and ``train``, which runs a job on a cluster. Names load on first use: the command's ``--help``
imports none of torch, matplotlib, TensorBoard or rich.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "train": "distbelief.launch.train",
    "RunResult": "distbelief.launch.train",
    "Cluster": "distbelief.launch.cluster",
    "Fault": "distbelief.launch.cluster",
    "ProcessKind": "distbelief.launch.cluster",
    "ProcessSpec": "distbelief.launch.cluster",
    "RESTART_POLICIES": "distbelief.launch.cluster",
    "LocalCluster": "distbelief.launch.local",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distbelief.launch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
