"""A Sandblaster worker's process function: the job's replica and training set, handed to the
portion loop (``optim/sandblaster.py``) against the coordinator and the shards. Run by the
launcher's children; reports through ``emit`` and knows nothing of who started it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from distbelief.data import load_job_dataset
from distbelief.optim.sandblaster import PortionInfo, run_sandblaster_worker
from distbelief.process import Emit, StopFlag
from distbelief.worker.replica import build_replica

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity


def run_sandblaster_job_worker(
    config: JobConfig,
    rank: int,
    addresses: Sequence[str],
    coordinator: str,
    *,
    emit: Emit,
    security: WireSecurity | None = None,
    after_portion: Callable[[PortionInfo], None] | None = None,
    stop: StopFlag | None = None,
) -> dict:
    """Worker ``rank`` of the Sandblaster job ``config``: computes the portions the
    coordinator at ``coordinator`` hands it until told to stop (by it, or by ``stop``: the
    coordinator has finished).

    Returns:
        ``rank``, ``steps`` (portions computed) and the worker's figures.

    Raises:
        CoordinatorUnavailableError: the coordinator did not answer within the retry timeout.
        ShardTimeoutError, ShardUnavailableError: a shard did not answer.
    """
    torch.set_num_threads(config.cluster.threads_per_worker)
    train_set = load_job_dataset(config.data, "train")
    model = build_replica(config, train_set.input_shape, train_set.num_classes)
    result = run_sandblaster_worker(
        model,
        train_set,
        rank,
        coordinator,
        addresses,
        emit=emit,
        timeout_s=config.faults.timeout_s,
        retry_timeout_s=config.faults.retry_timeout_s,
        security=security,
        portions_per_push=config.sandblaster.portions_per_push,
        after_portion=after_portion,
        stop=stop,
        source_host=config.cluster.worker_host or None,
    )
    return {"steps": result.get("portions", 0), **result}
