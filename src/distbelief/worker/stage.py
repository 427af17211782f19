"""A stage's process function: one partition of a model-parallel replica, trained with
DownpourSGD against its own parameter group on the shards, exchanging activations and their
gradients with the replica's neighbouring stages on the pipeline schedule. Run by the
launcher's children and by ``distbelief worker --stage``; reports through ``emit``.

What a partitioned replica guarantees: all its stages take step k on batch k together (each
stage's backward needs the next stage's gradients of that batch), and each stage pushes and
pulls its own parameters every ``n_push`` / ``n_pull`` steps, as a whole-model worker does. The
stages' pulls are not one snapshot: partition 1 may load the shards' values of a moment later
than partition 0, as a whole-model worker's pull may already mix updates of other replicas
applied to shard 0 but not yet to shard 1. Downpour allows no more than that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from distbelief.data import load_job_dataset, worker_indices
from distbelief.pipeline.engine import PipelineStage
from distbelief.pipeline.job import (
    check_stage_budget,
    job_split,
    model_builder,
    partition_parameters,
    stage_group,
    stage_plan,
)
from distbelief.pipeline.layers import build_stage
from distbelief.pipeline.wire_links import WireLinks
from distbelief.process import Emit
from distbelief.telemetry.metrics import make_record
from distbelief.worker.loop import worker_batches
from distbelief.worker.run import job_optimizer, push_reporter

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity


class _Window:
    """A stage's figures between two metric records."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.samples = 0.0, 0, 0
        self.compute_s, self.idle_s, self.activation_bytes = 0.0, 0.0, 0
        self.steps = 0

    def add(self, figures) -> None:
        self.steps += 1
        self.compute_s += figures.compute_s
        self.idle_s += figures.wait_s
        self.activation_bytes += figures.bytes_sent + figures.bytes_received
        self.samples += figures.num_samples
        if figures.loss_sum is not None:
            self.loss_sum += figures.loss_sum
            self.correct += figures.num_correct

    def fields(self, last_stage: bool) -> dict:
        fields = {
            "compute_s": self.compute_s,
            "idle_s": self.idle_s,
            "activation_bytes": self.activation_bytes,
        }
        if last_stage and self.samples:
            fields.update(loss=self.loss_sum / self.samples, accuracy=self.correct / self.samples)
        return fields


def run_stage_worker(
    config: JobConfig,
    rank: int,
    stage: int,
    addresses: Sequence[str],
    *,
    emit: Emit,
    bind: str = "",
    next_stage: str = "",
    start_time: float = 0.0,
    security: WireSecurity | None = None,
    resume_step: int = 0,
    restarted: bool = False,
) -> dict:
    """Train partition ``stage`` of replica ``rank`` until the replica's batches run out.

    Emits "ready" (``address``: where the previous stage reaches this one; stage 0 has none)
    once listening, "started" before the first step, and a "metric" record (role worker,
    with ``stage``, ``compute_s``, ``idle_s``, ``activation_bytes``; the last stage adds the
    loss and accuracy) every ``config.reporting.log_every_steps`` steps, and once more at the
    last step for a shorter last window; "pushed" (``stage`` too) once each push is applied.

    Args:
        bind: Where stages after the first listen for the previous stage.
        next_stage: The next stage's address (every stage but the last).
        resume_step: A restarted replica's step, its last push every shard applied (of its
            every stage): it starts from the shards' parameters and skips the batches up to it.
        restarted: A life after a death: the steps after ``resume_step`` whose pushes this
            stage's shards took from its previous life (a stage a push ahead of another, or
            one in flight, taken by some shards only) are done again, and no shard is sent a
            push of a step it took.

    Returns:
        ``rank``, ``stage`` and ``steps``.

    Raises:
        PipelineError: a neighbouring stage did not answer in time (StageTimeoutError) or
            went away (StageUnavailableError).
        ConfigFieldError: the partition needs more than ``--max-stage-bytes``, or a
            neighbouring stage was given another model, split, ... (``stage_plan``).
        ShardTimeoutError, ShardUnavailableError: a shard did not answer.
    """
    num_stages = config.pipeline.num_partitions
    torch.set_num_threads(config.cluster.threads_per_worker)
    train_set = load_job_dataset(config.data, "train")
    split = job_split(config, train_set.input_shape, train_set.num_classes)
    build = model_builder(config, train_set.input_shape, train_set.num_classes)
    full_model, stage_module = build_stage(build, split.bounds, stage, seed=config.model.seed)
    named = partition_parameters(full_model, stage_module)
    check_stage_budget(config, stage, [p for _, p in named])
    links = WireLinks(
        stage,
        num_stages,
        bind=bind or None,
        next_address=next_stage or None,
        security=security,
        timeout_s=config.faults.timeout_s,
        source_host=config.cluster.worker_host or None,
        plan=stage_plan(config, rank, split),
        # Started by hand, last first: the stage before may come later, as long as a stage
        # waits for the next one to be reachable (wait_for_peer below).
        first_contact_timeout_s=config.faults.timeout_s + config.faults.retry_timeout_s,
        first_step=resume_step + 1,
    )
    optimizer = None
    try:
        emit("ready", {"rank": rank, "stage": stage, "address": links.address})
        try:
            if stage < num_stages - 1:
                links.wait_for_peer(config.faults.timeout_s + config.faults.retry_timeout_s)
            optimizer = job_optimizer(
                config,
                rank,
                [p for _, p in named],
                full_model,
                addresses,
                security,
                resume_step=resume_step,
                group=stage_group(stage),
                on_push_applied=push_reporter(emit, rank, stage=stage),
            )
        except Exception as e:
            # The stage before would retry its connection to this one until its first-contact
            # bound, then report the connection: it is told why instead, before this one exits.
            bound_s = config.faults.timeout_s + config.faults.retry_timeout_s
            if stage > 0:  # said now: the wait for the stage before is silent otherwise
                logger.warning(
                    "stage %d cannot train (%s: %s); it exits once stage %d has been told why "
                    "(waiting up to %gs for it to connect)",
                    stage,
                    type(e).__name__,
                    str(e).strip().splitlines()[0] if str(e).strip() else "",
                    stage - 1,
                    bound_s,
                )
            links.fail(e, bound_s)
            raise
        # The replica's stages go on together, from the step the launcher gives every one.
        optimizer.resume(resume_step, optimizer.client.pushed_steps if restarted else None)
        steps = _train(
            config,
            rank,
            stage,
            train_set,
            stage_module,
            optimizer,
            links,
            emit,
            start_time,
            resume_step,
        )
        optimizer.close()  # pushes what is left
        # The previous stage may still be fetching this stage's last gradients.
        links.drain(config.faults.timeout_s)
    except BaseException:
        if optimizer is not None:
            optimizer.client.close(wait=False)  # no flush: the shards may be what failed
        raise
    finally:
        links.close()
    return {"rank": rank, "stage": stage, "steps": steps}


def _train(
    config, rank, stage, train_set, stage_module, optimizer, links, emit, start_time, resume_step
) -> int:
    num_stages = config.pipeline.num_partitions
    last_stage = stage == num_stages - 1
    engine = PipelineStage(
        stage_module,
        stage,
        num_stages,
        links,
        num_micro_batches=config.pipeline.num_micro_batches,
        schedule=config.pipeline.schedule,
        timeout_s=config.faults.timeout_s,
    )
    indices = worker_indices(
        len(train_set), rank, config.cluster.num_workers, seed=config.model.seed
    )
    emit("started", {"rank": rank, "stage": stage, "time": time.time(), "step": resume_step})
    window = _Window()

    def report_window() -> None:
        staleness = optimizer.client.take_staleness()
        record = make_record(
            "worker",
            rank,
            time_s=time.time() - start_time,
            step=optimizer.num_steps,
            stage=stage,
            version=optimizer.version,
            staleness=sum(staleness) / len(staleness) if staleness else None,
            **window.fields(last_stage),
            **optimizer.client.take_wire_figures(),
        )
        emit("metric", record)

    upcoming = worker_batches(config, train_set, indices, resume_step)
    batch = next(upcoming, None)
    while batch is not None:
        images, labels = batch
        optimizer.zero_grad()
        figures = engine.run_batch(
            optimizer.num_steps + 1,
            images if stage == 0 else None,
            labels if last_stage else None,
            len(labels),
        )
        optimizer.step()
        window.add(figures)
        batch = next(upcoming, None)
        if batch is None:
            # The last step: its push, and close()'s push of what is left, leave before the
            # last report, so the records count every byte the stage pushed.
            optimizer.flush()
        if batch is None or optimizer.num_steps % config.reporting.log_every_steps == 0:
            report_window()  # the last steps, short of a whole window or not, are on record
            window = _Window()
    return optimizer.num_steps
