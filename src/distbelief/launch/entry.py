"""The function every process of a job runs, whatever Cluster started it: the role its
``ProcessSpec`` names, with the job's settings. The roles are imported when a process runs
one (a forkserver has them loaded already), so the launcher itself never imports them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distbelief.launch.cluster import CHECKPOINT_DIR, ProcessKind, ProcessSpec
from distbelief.process import Emit, StopFlag

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity

ROLE_MODULES = (
    "distbelief.server.process",
    "distbelief.worker",
    "distbelief.evaluator",
)
"""What ``run_role`` imports: a cluster that can load them ahead of time should."""


def run_role(
    emit: Emit,
    spec: ProcessSpec,
    config: JobConfig,
    addresses: Sequence[str],
    security: WireSecurity,
    stop: StopFlag,
) -> Any:
    """Runs the role of ``spec``: serves a shard until ``stop``, trains a worker until its
    batches run out, or evaluates until ``stop`` and once more after it.

    Args:
        addresses: the shards' addresses in shard-id order (unused by shards).
        stop: the stop flag of the process's kind (unused by workers: they stop on SIGTERM).

    Returns:
        What the role returned (counters, steps, the last evaluation).
    """
    if spec.kind is ProcessKind.SHARD:
        from distbelief.server.process import serve_job_shard

        return serve_job_shard(
            config,
            spec.index,
            spec.bind,
            security=security,
            checkpoint_dir=str(Path(config.reporting.out_dir) / CHECKPOINT_DIR),
            emit=emit,
            stop=stop,
        )
    if spec.kind is ProcessKind.WORKER:
        from distbelief.worker import run_worker

        return run_worker(
            config,
            spec.index,
            addresses,
            emit=emit,
            security=security,
            resume_step=spec.resume_step,
        )
    from distbelief.evaluator import run_evaluator

    return run_evaluator(config, addresses, emit=emit, start_time=0.0, stop=stop, security=security)
