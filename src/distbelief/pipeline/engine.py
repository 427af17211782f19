"""One stage's part of a training step: the forward and backward passes of its partition over a
batch's micro-batches, in its schedule's order, exchanging activations and gradients with the
neighbouring stages through its links.

The gradients a batch leaves in the partition's parameters equal those of the mean
cross-entropy over the whole batch on the unpartitioned model; applying them (and zeroing them
before the next batch) is the caller's job, like every torch training loop's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from distbelief.config import check_count, check_wait
from distbelief.pipeline.links import StageLinks
from distbelief.pipeline.schedule import SCHEDULES

_T = TypeVar("_T")

_LINK_MEMBERS = ("send_forward", "recv_forward", "send_backward", "recv_backward", "close")


@dataclass
class StageStepFigures:
    """What one stage did in one step.

    Attributes:
        compute_s: Seconds spent computing forward and backward passes (and the loss).
        wait_s: Seconds blocked in the links' sends and receives.
        bytes_sent: Tensor payload bytes this stage's links sent in the step.
        bytes_received: Tensor payload bytes this stage's links received in the step.
        loss_sum: Last stage only: the cross-entropy summed over the batch's samples.
        num_correct: Last stage only: samples whose largest logit is the label.
        num_samples: The batch size.
    """

    compute_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    loss_sum: float | None = None
    num_correct: int | None = None
    num_samples: int = 0


@dataclass
class _Batch:
    """One batch's state on one stage while its schedule runs."""

    step: int
    batch_size: int
    figures: StageStepFigures
    image_pieces: tuple[torch.Tensor, ...] = ()
    label_pieces: tuple[torch.Tensor, ...] = ()
    # Per micro-batch until its backward: the input leaf (whose gradient goes upstream) and
    # the tensor to differentiate (the output, or on the last stage the loss).
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    held: dict[int, torch.Tensor] = field(default_factory=dict)
    loss_sum: torch.Tensor | None = None
    num_correct: torch.Tensor | None = None


class PipelineStage:
    """Runs one partition of a replica over each batch, as stage ``stage`` of ``num_stages``.

    Args:
        stage_module: The partition (e.g. ``build_stage``'s ``StageModule``).
        stage: This stage's index in ``[0, num_stages)``.
        num_stages: Number of stages P of the replica.
        links: Connections to the neighbouring stages (a ``StageLinks``).
        num_micro_batches: Micro-batches per batch (fewer when the batch is smaller).
        schedule: A name in ``distbelief.pipeline.schedule.SCHEDULES``.
        timeout_s: Longest wait for a neighbour's activation or gradient.

    Raises:
        ValueError: If an argument is out of range or of the wrong type (a count that is no
            integer, a timeout that is no finite number of seconds, links that are no
            ``StageLinks``), or the schedule is unknown.
    """

    def __init__(
        self,
        stage_module: nn.Module,
        stage: int,
        num_stages: int,
        links: StageLinks,
        *,
        num_micro_batches: int,
        schedule: str = "1f1b",
        timeout_s: float = 30.0,
    ) -> None:
        # Counts of another type (a float, a bool) would fail only at the first batch, deep
        # inside torch's tensor_split.
        check_count("num_stages", num_stages)
        check_count("stage", stage, least=0)
        if stage >= num_stages:
            raise ValueError(f"stage {stage} is not in [0, {num_stages})")
        check_count("num_micro_batches", num_micro_batches)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {tuple(SCHEDULES)}")
        check_wait("timeout_s", timeout_s)
        _check_links(links)
        self.module = stage_module
        self.stage = stage
        self.num_stages = num_stages
        self.links = links
        self.num_micro_batches = num_micro_batches
        self.schedule = schedule
        self.timeout_s = timeout_s
        first_param = next(stage_module.parameters(), None)
        self._device = first_param.device if first_param is not None else torch.device("cpu")

    @property
    def is_first(self) -> bool:
        """Whether this stage takes the batch's images."""
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage computes the loss."""
        return self.stage == self.num_stages - 1

    def run_batch(
        self,
        step: int,
        images: torch.Tensor | None,
        labels: torch.Tensor | None,
        batch_size: int,
    ) -> StageStepFigures:
        """Runs one batch's forward and backward passes through this partition.

        Gradients are accumulated into the partition's parameters. If a neighbour fails the
        batch is abandoned part way: the caller should not apply those gradients.

        Args:
            step: The step number, the same on every stage (it keys the links' messages).
            images: The batch's inputs: needed on stage 0, ignored elsewhere (may be None).
            labels: The batch's labels: needed on the last stage, ignored elsewhere.
            batch_size: The batch's number of samples, the same on every stage.

        Returns:
            This stage's figures for the step.

        Raises:
            ValueError: If ``batch_size`` is below 1, or this stage's images or labels are
                missing or hold another number of samples.
            StageTimeoutError: A neighbour did not send in time.
            StageUnavailableError: A neighbour could not be reached.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        num_micro = min(self.num_micro_batches, batch_size)
        batch = _Batch(step, batch_size, StageStepFigures(num_samples=batch_size))
        if self.is_first:
            _check_batch("images", images, batch_size, self.stage)
            batch.image_pieces = torch.tensor_split(images.to(self._device), num_micro)
        if self.is_last:
            _check_batch("labels", labels, batch_size, self.stage)
            batch.label_pieces = torch.tensor_split(labels.to(self._device), num_micro)
            batch.loss_sum = torch.zeros((), device=self._device)
            batch.num_correct = torch.zeros((), dtype=torch.long, device=self._device)

        sent_before = self.links.counters.bytes_sent
        received_before = self.links.counters.bytes_received
        for kind, micro in SCHEDULES[self.schedule](self.num_stages, self.stage, num_micro):
            if kind == "F":
                self._forward(batch, micro)
            else:
                self._backward(batch, micro)

        figures = batch.figures
        figures.bytes_sent = self.links.counters.bytes_sent - sent_before
        figures.bytes_received = self.links.counters.bytes_received - received_before
        if self.is_last:
            figures.loss_sum = float(batch.loss_sum)
            figures.num_correct = int(batch.num_correct)
        return figures

    def _forward(self, batch: _Batch, micro: int) -> None:
        if self.is_first:
            x = batch.image_pieces[micro]
        else:
            received = self._wait(
                batch.figures, self.links.recv_forward, batch.step, micro, self.timeout_s
            )
            # A leaf of this stage's graph: backward leaves the gradient to send upstream in
            # its .grad.
            x = received.to(self._device).detach().requires_grad_()
            batch.inputs[micro] = x
        start = time.perf_counter()
        out = self.module(x)
        if self.is_last:
            y = batch.label_pieces[micro]
            loss = F.cross_entropy(out, y, reduction="sum")
            batch.loss_sum += loss.detach()
            batch.num_correct += (out.detach().argmax(dim=1) == y).sum()
            # Dividing by the whole batch's size makes the micro-batches' gradients add up to
            # those of the batch's mean loss.
            batch.held[micro] = loss / batch.batch_size
        else:
            batch.held[micro] = out
        batch.figures.compute_s += time.perf_counter() - start
        if not self.is_last:
            self._wait(batch.figures, self.links.send_forward, batch.step, micro, out.detach())

    def _backward(self, batch: _Batch, micro: int) -> None:
        grad = None
        if not self.is_last:
            grad = self._wait(
                batch.figures, self.links.recv_backward, batch.step, micro, self.timeout_s
            ).to(self._device)
        start = time.perf_counter()
        batch.held.pop(micro).backward(grad)
        batch.figures.compute_s += time.perf_counter() - start
        if not self.is_first:
            x = batch.inputs.pop(micro)
            # An input the output does not depend on gets no gradient: send zeros.
            x_grad = x.grad if x.grad is not None else torch.zeros_like(x)
            self._wait(batch.figures, self.links.send_backward, batch.step, micro, x_grad)

    def _wait(self, figures: StageStepFigures, call: Callable[..., _T], *args) -> _T:
        """Calls a link method, counting its time as waiting."""
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            figures.wait_s += time.perf_counter() - start


def _check_links(links: object) -> None:
    # StageLinks is a typing Protocol, not a class to test with isinstance; links of another
    # kind (None) would fail only at the first batch's first send or receive.
    missing = [name for name in _LINK_MEMBERS if not callable(getattr(links, name, None))]
    if not hasattr(links, "counters"):
        missing.append("counters")
    if missing:
        raise ValueError(
            f"links must be a StageLinks (e.g. from local_links), got {type(links).__name__} "
            f"without {', '.join(missing)}"
        )


def _check_batch(what: str, tensor: torch.Tensor | None, batch_size: int, stage: int) -> None:
    if tensor is None:
        raise ValueError(f"stage {stage} needs the batch's {what}, got None")
    if tensor.shape[0] != batch_size:
        raise ValueError(f"{what} hold {tensor.shape[0]} samples, but batch_size is {batch_size}")
