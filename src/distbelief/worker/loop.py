"""The worker's training loop: its batches in their fixed order, and forward, backward, step on
a device, with a metrics record every few steps and the per-step hooks. It reports through a
callback and knows nothing of processes or files."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from distbelief.data import ArrayDataset, CtrDataset, iterate_batches, iterate_ctr_batches
from distbelief.optim import DownpourSGD
from distbelief.worker.hooks import StepHook, after_step

if TYPE_CHECKING:
    from distbelief.config import JobConfig

Batch = tuple[torch.Tensor, torch.Tensor]


def worker_batches(
    config: JobConfig, dataset: ArrayDataset | CtrDataset, indices: torch.Tensor, skip: int = 0
) -> Iterator[tuple[torch.Tensor, ...]]:
    """A worker's batches in their fixed order (``(images, labels)``; a click log's ``(dense,
    sparse, labels)``), without the first ``skip``: ``config.optimizer.steps`` of them, or
    ``config.optimizer.num_epochs`` passes over ``indices``."""
    iterate = iterate_ctr_batches if isinstance(dataset, CtrDataset) else iterate_batches
    epoch = 0
    steps = 0
    while config.optimizer.steps is not None or epoch < config.optimizer.num_epochs:
        steps_before = steps
        for batch in iterate(
            dataset, indices, config.optimizer.minibatch_size, seed=config.model.seed, epoch=epoch
        ):
            steps += 1
            if steps > skip:
                yield batch
            if config.optimizer.steps is not None and steps >= config.optimizer.steps:
                return
        if steps == steps_before:
            # Every epoch would be as empty: --steps would never be reached.
            raise ValueError(
                f"--batch-size: a batch of {config.optimizer.minibatch_size} examples is more "
                f"than this worker's {len(indices)} examples of the training set (a pass drops "
                "its last, partial batch)"
            )
        epoch += 1


def train_loop(
    model: nn.Module,
    optimizer: DownpourSGD,
    batches: Iterable[Batch],
    *,
    log_every_steps: int,
    report: Callable[..., None],
    hooks: Sequence[StepHook] = (),
    device: torch.device | str = "cpu",
) -> int:
    """Forward, backward, step for each batch (moved to ``device``, where the model is); every
    ``log_every_steps`` steps (and at the last step, after a flush of the pushes, for a shorter
    last window) ``report(**fields)`` with the window's loss, accuracy, staleness and wire
    figures; after each step (before its report) every hook's ``after_step``.

    Returns:
        The optimizer's step count when the batches ran out or a hook stopped the loop.

    Raises:
        ShardTimeoutError, ShardUnavailableError: a push or pull failed (see ``DownpourSGD``).
    """
    device = torch.device(device)
    window_loss, window_correct, window_seen = 0.0, 0, 0

    def report_window() -> None:
        staleness = optimizer.client.take_staleness()
        report(
            step=optimizer.num_steps,
            loss=window_loss / window_seen,
            accuracy=window_correct / window_seen,
            version=optimizer.version,
            staleness=sum(staleness) / len(staleness) if staleness else None,
            **optimizer.client.take_wire_figures(),
        )

    upcoming = iter(batches)
    batch = next(upcoming, None)
    while batch is not None:
        images, labels = batch
        started = time.perf_counter()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()  # waits for the device: the step's time is all in compute_s
        compute_s = time.perf_counter() - started
        window_loss += loss_value * len(labels)
        window_correct += int((logits.argmax(dim=1) == labels).sum())
        window_seen += len(labels)
        stop = after_step(
            hooks,
            step=optimizer.num_steps,
            loss=loss_value,
            batch_size=len(labels),
            compute_s=compute_s,
        )
        batch = None if stop else next(upcoming, None)
        if batch is None:
            # The last step: its push, and close()'s push of what is left, leave before the
            # last report, so the records count every byte the worker pushed.
            optimizer.flush()
        if batch is None or optimizer.num_steps % log_every_steps == 0:
            report_window()  # the last steps, short of a whole window or not, are on record
            window_loss, window_correct, window_seen = 0.0, 0, 0
    return optimizer.num_steps
