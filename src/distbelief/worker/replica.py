"""The model replica every process of a job builds identically (same seed, same layout)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from distbelief.models import build_model

if TYPE_CHECKING:
    from distbelief.config import JobConfig


def build_replica(config: JobConfig, input_shape, num_classes: int) -> nn.Module:
    """``config.model.name`` for ``input_shape`` inputs and ``num_classes`` classes, initialised
    from ``config.model.seed`` so that workers, evaluator and shards agree on every parameter."""
    torch.manual_seed(config.model.seed)
    return build_model(config.model.name, input_shape, num_classes)
