"""What only the end of a job's cluster settles for its ``RunResult``: the faults the cluster
saw while it stopped the processes (shown here, the progress display being closed by then),
and a Sandblaster run's committed iteration, which ``--resume`` goes on from; and how a fault
reads, on the line the launcher prints and on metrics.csv's clock. It starts and stops nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from distbelief.coordinator.checkpoint import read_record
from distbelief.errors import CheckpointError
from distbelief.launch.cluster import CHECKPOINT_DIR, Cluster, Fault, ProcessKind, shard_names

if TYPE_CHECKING:
    from pathlib import Path

    from distbelief.config import JobConfig
    from distbelief.launch.summary import RunResult

logger = logging.getLogger(__name__)


def on_metrics_clock(faults: list[Fault], offset_s: float) -> list[Fault]:
    """``faults`` with their ``time_s`` on metrics.csv's time axis: a resumed run's records
    continue the earlier run's clock (``MetricsWriter``), and its faults must line up with
    them. Copies: the cluster's own keep this launch's clock."""
    return [dataclasses.replace(fault, time_s=fault.time_s + offset_s) for fault in faults]


def add_what_the_stop_settled(
    result: RunResult, cluster: Cluster, config: JobConfig, *, time_offset_s: float
) -> None:
    """What only the cluster's stop settles, into ``result``: the faults it saw while it
    stopped (shown here: the progress display is closed by then), the counters the shards
    returned as they stopped (a run ended early knew their last heartbeat's), and a
    Sandblaster run's ``resumes_from_iteration``, the iteration of the coordinator's last
    committed checkpoint, which ``--resume`` goes on from (metrics.csv may have rows past it: a
    coordinator killed as it stopped committed none of them), and so whether a shard that died
    while the job stopped had its last state saved (``Fault.last_checkpoint_saved``)."""
    for fault in cluster.faults[len(result.faults) :]:
        logger.warning("%s", describe_fault(fault))
    result.faults = on_metrics_clock(cluster.faults, time_offset_s)
    # A shard asked to stop returns its counters: they count the pushes of the last moments,
    # which its last heartbeat, all a job ended early knew before the stop, had not.
    for shard_id, returned in cluster.results(ProcessKind.SHARD).items():
        name = f"shard{shard_id}"
        if "staleness" in returned:
            result.staleness[name] = returned["staleness"]
        if name in result.shards and "worker_hosts" in returned:
            result.shards[name]["worker_hosts"] = returned["worker_hosts"]
    if config.optimizer.algorithm != "sandblaster":
        return
    committed = _committed_iteration(result.run_dir)
    result.coordinator["resumes_from_iteration"] = committed
    reached = result.coordinator.get("iterations")
    # A Sandblaster shard saves only the checkpoints the coordinator commits: it died with
    # nothing unsaved when the last one committed is the last iteration the job reached.
    saved = committed is not None and (reached is None or committed >= reached)
    for fault in result.faults:
        if fault.process in shard_names(config.cluster.num_shards) and fault.while_stopping:
            fault.last_checkpoint_saved = saved
    if committed is not None and reached is not None and reached > committed:
        logger.warning(
            "the last committed checkpoint is iteration %d (metrics.csv goes on to %d): "
            "--resume goes on from iteration %d",
            committed,
            reached,
            committed,
        )


def _committed_iteration(run_dir: Path) -> int | None:
    """The iteration of the coordinator's last committed checkpoint; None: none, or one that
    cannot be read (``--resume`` names its fault)."""
    try:
        record = read_record(run_dir / CHECKPOINT_DIR)
    except CheckpointError:
        return None
    return None if record is None else record["iteration"]


def describe_fault(fault: Fault) -> str:
    """The line the launcher prints for ``fault``."""
    code = ""
    if fault.exitcode is not None and fault.cause is not None:
        code = f" (exit code {fault.exitcode}: {fault.cause})"
    elif fault.exitcode is not None:
        code = f" (exit code {fault.exitcode})"
    elif fault.cause is not None:
        code = f" ({fault.cause})"
    stopping = " while the job stopped" if fault.while_stopping else ""
    if fault.error is not None:
        text = f"{fault.process} failed{code}{stopping}: {fault.error}; {fault.action}"
    else:
        text = f"{fault.process} died{code}{stopping}; {fault.action}"
    if fault.version_before:  # none seen: "at least 0 updates" says nothing
        text += f"; it had applied at least {fault.version_before} updates"
    return text
