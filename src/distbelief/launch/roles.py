"""The three roles of a job, each a plain function run in its own process: shard, worker,
evaluator. Each reports through ``emit(kind, payload)``; the launcher or the CLI decides where
reports go."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from distbelief.data import ArrayDataset, iterate_batches, load_dataset, worker_indices
from distbelief.launch.config import TrainConfig
from distbelief.metrics import make_record
from distbelief.models import build_model
from distbelief.optim import DownpourSGD
from distbelief.server import ConsistencyConfig, ParameterShard, ShardService
from distbelief.server.optimizers import ServerOptimizerFactory
from distbelief.wire import serve

logger = logging.getLogger(__name__)

Emit = Callable[[str, object], None]
"""Reports ``(kind, payload)``: "ready", "metric"; the caller routes it."""


class StopFlag(Protocol):
    """A threading.Event or a multiprocessing Event."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


_EVAL_BATCH_SIZE = 512


def serve_shard(
    shard_id: int,
    num_shards: int,
    bind: str,
    *,
    optimizer_factory: ServerOptimizerFactory,
    consistency: ConsistencyConfig | None = None,
    emit: Emit,
    stop: StopFlag | None = None,
) -> dict:
    """Serve one shard at ``bind`` until ``stop`` is set (or forever); returns its counters
    and staleness histogram."""
    stop = stop if stop is not None else threading.Event()
    shard = ParameterShard(shard_id, num_shards, optimizer_factory, consistency)
    server = serve(bind, ShardService(shard))
    emit("ready", {"shard_id": shard_id, "address": server.address})
    logger.info("shard %d of %d serving at %s", shard_id, num_shards, server.address)
    try:
        # Short waits, not one long one, so SIGTERM's SystemExit is raised promptly.
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
    counters = shard.counters()
    return {
        "shard_id": shard_id,
        "version": counters.version,
        "num_pushes": counters.num_pushes,
        "num_dropped": counters.num_dropped,
        "staleness": shard.staleness.as_dict(),
    }


def build_replica(config: TrainConfig, input_shape, num_classes: int) -> nn.Module:
    """The model every process of the job builds identically (same seed, same layout)."""
    torch.manual_seed(config.seed)
    return build_model(config.model, input_shape, num_classes)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ArrayDataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on all of ``dataset``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(dataset), _EVAL_BATCH_SIZE):
        images = dataset.images[start : start + _EVAL_BATCH_SIZE]
        labels = dataset.labels[start : start + _EVAL_BATCH_SIZE]
        logits = model(images)
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum())
    model.train(was_training)
    return total_loss / len(dataset), correct / len(dataset)


def _batches(config: TrainConfig, dataset: ArrayDataset, indices: torch.Tensor):
    epoch = 0
    steps = 0
    while config.steps is not None or epoch < config.num_epochs:
        for batch in iterate_batches(
            dataset, indices, config.batch_size, seed=config.seed, epoch=epoch
        ):
            yield epoch, batch
            steps += 1
            if config.steps is not None and steps >= config.steps:
                return
        epoch += 1


def run_worker(
    config: TrainConfig, rank: int, addresses: Sequence[str], *, emit: Emit, start_time: float
) -> dict:
    """Train one replica with DownpourSGD on its slice of the training set."""
    torch.set_num_threads(config.threads_per_worker)
    train_set = load_dataset(
        config.dataset, split="train", data_dir=config.data_dir, download=config.download
    )
    indices = worker_indices(len(train_set), rank, config.num_workers, seed=config.seed)
    model = build_replica(config, train_set.input_shape, train_set.num_classes)
    optimizer = DownpourSGD(
        model.parameters(),
        lr=config.lr,
        n_push=config.n_push,
        n_pull=config.n_pull,
        model=model,
        ps=list(addresses),
        timeout_s=config.timeout_s,
        blocking=config.blocking,
        worker_id=f"worker{rank}",
        # Warmstart: replica 0 trains alone until the shards have applied its first K pushes.
        start_after_version=config.warmstart_steps if rank > 0 else 0,
    )
    emit("started", {"rank": rank, "time": time.time()})
    window_loss, window_correct, window_seen = 0.0, 0, 0
    try:
        for _epoch, (images, labels) in _batches(config, train_set, indices):
            optimizer.zero_grad()
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            window_loss += loss.item() * len(labels)
            window_correct += int((logits.argmax(dim=1) == labels).sum())
            window_seen += len(labels)
            if optimizer.num_steps % config.log_every_steps == 0:
                staleness = optimizer.client.take_staleness()
                emit(
                    "metric",
                    make_record(
                        "worker",
                        rank,
                        time_s=time.time() - start_time,
                        step=optimizer.num_steps,
                        loss=window_loss / window_seen,
                        accuracy=window_correct / window_seen,
                        version=optimizer.version,
                        staleness=sum(staleness) / len(staleness) if staleness else None,
                    ),
                )
                window_loss, window_correct, window_seen = 0.0, 0, 0
    finally:
        optimizer.close()
    return {"rank": rank, "steps": optimizer.num_steps}
