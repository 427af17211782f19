"""Loss and accuracy of a model on a whole data set: what the evaluator measures, and what
scripts use to score a model the same way."""

from __future__ import annotations

import torch
from torch import nn

from distbelief.data import ArrayDataset

_EVAL_BATCH_SIZE = 512


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ArrayDataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on all of ``dataset`` (on the model's
    device; the model's train/eval mode is left as it was)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    for start in range(0, len(dataset), _EVAL_BATCH_SIZE):
        images = dataset.images[start : start + _EVAL_BATCH_SIZE].to(device)
        labels = dataset.labels[start : start + _EVAL_BATCH_SIZE].to(device)
        logits = model(images)
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum())
    model.train(was_training)
    return total_loss / len(dataset), correct / len(dataset)
