"""The worker role of a job, a plain function run in its own process, and the model and
evaluation every role shares. It reports through ``emit(kind, payload)``; the launcher or the CLI
decides where reports go."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from distbelief.data import ArrayDataset, iterate_batches, load_dataset, worker_indices
from distbelief.launch.config import TrainConfig
from distbelief.models import build_model
from distbelief.optim import DownpourSGD
from distbelief.process import Emit
from distbelief.telemetry.metrics import make_record
from distbelief.wire.security import WireSecurity

logger = logging.getLogger(__name__)

_EVAL_BATCH_SIZE = 512


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


def _batches(config: TrainConfig, dataset: ArrayDataset, indices: torch.Tensor, skip: int = 0):
    """The worker's batches in their fixed order, without the first ``skip``."""
    epoch = 0
    steps = 0
    while config.steps is not None or epoch < config.num_epochs:
        for batch in iterate_batches(
            dataset, indices, config.batch_size, seed=config.seed, epoch=epoch
        ):
            steps += 1
            if steps > skip:
                yield epoch, batch
            if config.steps is not None and steps >= config.steps:
                return
        epoch += 1


def _train_loop(
    config: TrainConfig,
    model: nn.Module,
    optimizer: DownpourSGD,
    batches,
    report: Callable[..., None],
) -> None:
    """Forward, backward, step; every ``log_every_steps`` a record of the window's loss,
    accuracy, staleness and wire figures."""
    window_loss, window_correct, window_seen = 0.0, 0, 0
    for _epoch, (images, labels) in batches:
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
            report(
                step=optimizer.num_steps,
                loss=window_loss / window_seen,
                accuracy=window_correct / window_seen,
                version=optimizer.version,
                staleness=sum(staleness) / len(staleness) if staleness else None,
                **optimizer.client.take_wire_figures(),
            )
            window_loss, window_correct, window_seen = 0.0, 0, 0


def run_worker(
    config: TrainConfig,
    rank: int,
    addresses: Sequence[str],
    *,
    emit: Emit,
    start_time: float,
    security: WireSecurity | None = None,
    resume_step: int = 0,
) -> dict:
    """Train one replica with DownpourSGD on its slice of the training set.

    A restarted worker passes ``resume_step``: it starts from the shards' current parameters
    and skips the batches its previous life already trained on.
    """
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
        start_after_version=config.warmstart_steps if rank > 0 and not resume_step else 0,
        retry_timeout_s=config.retry_timeout_s,
        security=security,
    )
    optimizer.num_steps = resume_step
    emit("started", {"rank": rank, "time": time.time()})
    try:
        _train_loop(
            config,
            model,
            optimizer,
            _batches(config, train_set, indices, resume_step),
            lambda **fields: emit(
                "metric", make_record("worker", rank, time_s=time.time() - start_time, **fields)
            ),
        )
        optimizer.close()  # pushes what is left
    except BaseException:
        optimizer.client.close(wait=False)  # no flush: the shards may be what failed
        raise
    return {"rank": rank, "steps": optimizer.num_steps}
