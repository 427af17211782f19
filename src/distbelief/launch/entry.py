"""The function every process of a job runs, whatever Cluster started it: the role its
``ProcessSpec`` names, with the job's settings. The roles are imported when a process runs
one (a forkserver has them loaded already), so the launcher itself never imports them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distbelief.launch.cluster import (
    CHECKPOINT_DIR,
    EXIT_PEER_LOST,
    NEIGHBOUR_LOST,
    ProcessKind,
    ProcessSpec,
)
from distbelief.process import Emit, StopFlag

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity

ROLE_MODULES = (
    "distbelief.server.process",
    "distbelief.worker",
    "distbelief.evaluator",
    "distbelief.coordinator.run",
    "distbelief.worker.sandblaster",
    "distbelief.worker.stage",
)
"""What ``run_role`` imports: a cluster that can load them ahead of time should."""

PRELOADED_MODULES = ("torch", *ROLE_MODULES)
"""What a process that forks a job's processes (the local forkserver, a Ray node's zygote)
loads once first: torch and the roles. Not ``torch._dynamo``, which no role needs: the workers'
DownpourSGD and the shards' optimizers run torch's methods without the guards that import it
(``unguarded.py``)."""


def run_role(
    emit: Emit,
    spec: ProcessSpec,
    config: JobConfig,
    addresses: Sequence[str],
    security: WireSecurity,
    stop: StopFlag,
) -> Any:
    """Runs the role of ``spec``: serves a shard until ``stop``, trains a worker until its
    batches run out (Sandblaster's: until its coordinator says stop), evaluates until ``stop``
    and once more after it, or coordinates Sandblaster L-BFGS to its end.

    Args:
        addresses: the shards' addresses in shard-id order (unused by shards).
        stop: the stop flag of the process's kind (unused by Downpour's workers: they stop on
            SIGTERM). Sandblaster's workers find the coordinator at ``spec.coordinator``.

    Returns:
        What the role returned (counters, steps, the last evaluation).
    """
    from distbelief.wire.channels.shm import apply_job_transport

    # Set here, not inherited: a forkserver started before the launcher knew the job's.
    apply_job_transport(config.cluster.transport)
    checkpoint_dir = str(Path(config.reporting.out_dir) / CHECKPOINT_DIR)
    sandblaster = config.optimizer.algorithm == "sandblaster"
    if spec.kind is ProcessKind.SHARD:
        from distbelief.server.process import serve_job_shard

        restore_from = None
        if sandblaster:
            from distbelief.coordinator.checkpoint import restore_folder

            # The coordinator's last committed checkpoint; None: a first run (its shards save
            # only under tags, so the folder itself holds nothing to restore).
            restore_from = restore_folder(checkpoint_dir)
        return serve_job_shard(
            config,
            spec.index,
            spec.bind,
            security=security,
            checkpoint_dir=checkpoint_dir,
            restore_from=restore_from,
            emit=emit,
            stop=stop,
        )
    if spec.kind is ProcessKind.COORDINATOR:
        from distbelief.coordinator.run import run_coordinator

        return run_coordinator(
            config,
            addresses,
            bind=spec.bind,
            emit=emit,
            stop=stop,
            checkpoint_dir=checkpoint_dir,
            security=security,
        )
    if spec.kind is ProcessKind.WORKER and sandblaster:
        from distbelief.worker.sandblaster import run_sandblaster_job_worker

        return run_sandblaster_job_worker(
            config,
            spec.index,
            addresses,
            spec.coordinator,
            emit=emit,
            security=security,
            stop=stop,
        )
    if spec.kind is ProcessKind.STAGE:
        return _run_stage(emit, spec, config, addresses, security)
    if spec.kind is ProcessKind.WORKER:
        from distbelief.worker import run_worker

        return run_worker(
            config,
            spec.index,
            addresses,
            emit=emit,
            security=security,
            resume_step=spec.resume_step,
            restarted=spec.restarted,
        )
    from distbelief.evaluator import run_evaluator

    return run_evaluator(config, addresses, emit=emit, start_time=0.0, stop=stop, security=security)


def _run_stage(
    emit: Emit,
    spec: ProcessSpec,
    config: JobConfig,
    addresses: Sequence[str],
    security: WireSecurity,
) -> Any:
    from distbelief.errors import PipelineError
    from distbelief.worker.stage import run_stage_worker

    try:
        return run_stage_worker(
            config,
            spec.index,
            spec.stage,
            addresses,
            emit=emit,
            bind=spec.bind,
            next_stage=spec.next_stage,
            security=security,
            resume_step=spec.resume_step,
            restarted=spec.restarted,
        )
    except PipelineError as e:
        # A neighbour died (the cluster restarts the replica): this stage did nothing wrong.
        logging.getLogger(__name__).warning("%s: %s", spec.name, e)
        emit(NEIGHBOUR_LOST, {"error": f"{type(e).__name__}: {e}"})
        raise SystemExit(EXIT_PEER_LOST) from None
