"""A worker's process function: one replica trained with DownpourSGD on its slice of the
training set, on a device. Run by the launcher's children, by ``distbelief worker`` and by
scripts; it reports through ``emit(kind, payload)`` and knows nothing of who started it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from distbelief.data import load_job_dataset, worker_indices
from distbelief.optim import DownpourSGD
from distbelief.process import Emit
from distbelief.telemetry.metrics import make_record
from distbelief.worker.hooks import StepHook
from distbelief.worker.loop import train_loop, worker_batches
from distbelief.worker.replica import build_replica

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device; ValueError when it is no device name (``"tpu"``) or names
    a CUDA device this machine does not have, TypeError when it is neither a str nor a
    torch.device."""
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device must be a str or a torch.device, got {device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:  # torch's own message lists its every backend; name ours
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda or cuda:N)") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved


def job_optimizer(
    config: JobConfig,
    rank: int,
    params,
    model,
    addresses: Sequence[str],
    security: WireSecurity | None,
    *,
    resume_step: int = 0,
    group: str = "",
    on_push_applied: Callable[[int], None] | None = None,
) -> DownpourSGD:
    """Replica ``rank``'s DownpourSGD over ``params`` (all of ``model``'s, or one partition's
    in parameter group ``group``), with the job's rates, periods, timeouts, warmstart and wire
    compression; ``on_push_applied`` as DownpourSGD's."""
    return DownpourSGD(
        params,
        lr=config.optimizer.lr,
        n_push=config.optimizer.n_push,
        n_pull=config.optimizer.n_pull,
        model=model,
        ps=list(addresses),
        timeout_s=config.faults.timeout_s,
        blocking=config.optimizer.blocking,
        worker_id=f"worker{rank}",
        # Warmstart: replica 0 trains alone until the shards have applied its first K pushes.
        start_after_version=config.optimizer.warmstart_steps if rank > 0 and not resume_step else 0,
        retry_timeout_s=config.faults.retry_timeout_s,
        security=security,
        group=group,
        wire_dtype=config.optimizer.wire_dtype,
        push_compression=config.optimizer.push_compression,
        source_host=config.cluster.worker_host or None,
        num_workers=config.cluster.num_workers,
        on_push_applied=on_push_applied,
    )


def push_reporter(emit: Emit, rank: int, **where: int) -> Callable[[int], None]:
    """What tells the launcher the step of each push every shard applied: a "pushed" event
    (``rank``, ``step`` and ``where``: a stage's ``stage``), where a restart goes on from.
    One small event per push, not per step."""
    return lambda step: emit("pushed", {"rank": rank, "step": step, **where})


def shards_pushed_step(recorded: Sequence[int | None]) -> int | None:
    """The step of the last push every shard took from a worker id (a dead life's, for a
    restarted worker), from each shard's word at the handshake (``recorded``: a client's
    ``pushed_steps``); None when one took none (or was restarted since: it knows none). A push
    in flight at a death may be one of them: taken, its answer lost."""
    if not recorded or None in recorded:
        return None
    return min(step for step in recorded if step is not None)


def start_training(
    config: JobConfig,
    rank: int,
    model,
    addresses: Sequence[str],
    security: WireSecurity | None,
    emit: Emit,
    *,
    resume_step: int,
    restarted: bool,
    on_push_applied: Callable[[int], None] | None = None,
    rows_pushed: Sequence[int | None] | None = None,
) -> tuple[DownpourSGD, int]:
    """Replica ``rank``'s DownpourSGD over all of ``model``, reporting its pushes, and the
    step it goes on from, told in "started": ``resume_step`` (a dead life's last push every
    shard answered), or, ``restarted``, after a later push every shard took all the same
    (``shards_pushed_step``). A push in flight that only some shards took is done again and
    sent to the others only: each shard applies each step's update once.

    Args:
        on_push_applied: what hears of each push applied, in place of the "pushed" events
            (``push_reporter``).
        rows_pushed: a click worker's: per shard, the step of the last row push it took
            from the dead life (``RowClient.pushed_steps``); the worker then goes on after the
            last step whose dense and row pushes every shard took, and sends no shard a
            dense push of a step it took.
    """
    optimizer = job_optimizer(
        config,
        rank,
        model.parameters(),
        model,
        addresses,
        security,
        resume_step=resume_step,
        on_push_applied=on_push_applied or push_reporter(emit, rank),
    )
    dense = shards_pushed_step(optimizer.client.pushed_steps) if restarted else None
    recorded = dense
    if restarted and rows_pushed is not None:
        rows = shards_pushed_step(rows_pushed)
        recorded = None if dense is None or rows is None else min(dense, rows)
    resume_step = max(resume_step, recorded or 0)
    # A shard that took a later push than the others is sent none of its steps again.
    optimizer.resume(resume_step, optimizer.client.pushed_steps if restarted else None)
    emit("started", {"rank": rank, "time": time.time(), "step": resume_step})
    return optimizer, resume_step


def run_worker(
    config: JobConfig,
    rank: int,
    addresses: Sequence[str],
    *,
    emit: Emit,
    hooks: Sequence[StepHook] = (),
    device: torch.device | str | None = None,
    start_time: float = 0.0,
    security: WireSecurity | None = None,
    resume_step: int = 0,
    restarted: bool = False,
) -> dict:
    """Train one replica with DownpourSGD on worker ``rank``'s slice of the training set.

    Emits "started" (``rank``, ``time``, ``step``: where it starts) just before the first step,
    a "metric" record every ``config.reporting.log_every_steps`` steps (``time_s`` counted from
    ``start_time``; 0.0 gives wall clock times) and "pushed" (``push_reporter``) once each push
    is applied. A restarted worker passes ``resume_step`` and ``restarted``: it starts from the
    shards' current parameters after the last push its previous life got applied
    (``resumed_step``), and skips the batches up to it.

    Args:
        hooks: called after every step (see ``StepHook``); one may stop the worker early.
        device: where the model and each batch live ("cpu", "cuda", "cuda:1"); the gradients
            pushed and parameters pulled pass through it. Default: the job's
            ``cluster.device``.

    Returns:
        ``rank`` and ``steps``, the optimizer's step count at the end.

    Raises:
        ValueError: ``device`` is CUDA and this machine has none.
        ShardTimeoutError, ShardUnavailableError: a shard did not answer (see ``DownpourSGD``).
        ModelMismatchError: the shards hold another model's parameters.
    """
    device = resolve_device(config.cluster.device if device is None else device)
    if config.model.name == "dlrm":
        if device.type != "cpu":
            raise ValueError(f"device {str(device)!r}: the dlrm model trains on the CPU")
        from distbelief.worker.ctr import run_ctr_worker

        return run_ctr_worker(
            config,
            rank,
            addresses,
            emit=emit,
            hooks=hooks,
            start_time=start_time,
            security=security,
            resume_step=resume_step,
            restarted=restarted,
        )
    torch.set_num_threads(config.cluster.threads_per_worker)
    train_set = load_job_dataset(config.data, "train")
    indices = worker_indices(
        len(train_set), rank, config.cluster.num_workers, seed=config.model.seed
    )
    # On the device before the optimizer is built: it reads and writes the parameters there.
    model = build_replica(config, train_set.input_shape, train_set.num_classes)
    if config.pipeline.max_stage_bytes is not None:
        from distbelief.pipeline.job import check_stage_budget

        check_stage_budget(config, 0, model.parameters())  # the whole model is one partition
    model = model.to(device)
    optimizer, resume_step = start_training(
        config,
        rank,
        model,
        addresses,
        security,
        emit,
        resume_step=resume_step,
        restarted=restarted,
    )
    try:
        train_loop(
            model,
            optimizer,
            worker_batches(config, train_set, indices, resume_step),
            log_every_steps=config.reporting.log_every_steps,
            report=lambda **fields: emit(
                "metric", make_record("worker", rank, time_s=time.time() - start_time, **fields)
            ),
            hooks=hooks,
            device=device,
        )
        optimizer.close()  # pushes what is left
    except BaseException:
        optimizer.client.close(wait=False)  # no flush: the shards may be what failed
        raise
    return {"rank": rank, "steps": optimizer.num_steps}
