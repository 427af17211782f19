"""What a stage holds in memory for its parameters, to show what splitting a model saves.

Per parameter, a stage training with DownpourSGD holds five copies of its bytes: the parameter,
its gradient, and Downpour's three flat buffers (the accrued gradient, the outbox a push sends
from, and the inbox a pull lands in). Activations are not counted: they depend on the batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from distbelief.sharding import TensorSpec

COPIES_PER_PARAMETER = 5
"""Parameter, gradient, and DownpourSGD's accrued-gradient, outbox and inbox buffers."""


def _tensor_bytes(item: torch.Tensor | TensorSpec) -> int:
    if isinstance(item, TensorSpec):
        return item.numel * item.dtype.itemsize
    return item.numel() * item.element_size()


def stage_state_bytes(parameters: Iterable[torch.Tensor]) -> int:
    """Bytes a stage holds for its partition's parameters when training with DownpourSGD:
    5 x the parameters' bytes (parameters, gradients, and Downpour's accrued gradient, outbox
    and inbox).

    Args:
        parameters: The partition's parameters (meta-device tensors work: only their sizes
            are read).
    """
    return COPIES_PER_PARAMETER * sum(_tensor_bytes(p) for p in parameters)


def model_state_bytes(parameters: Iterable[torch.Tensor | TensorSpec]) -> int:
    """Bytes one process holds training the whole, unsplit model with DownpourSGD: 5 x the
    model's parameter bytes, as ``stage_state_bytes``.

    Args:
        parameters: The model's parameters, or their ``TensorSpec``s.
    """
    return COPIES_PER_PARAMETER * sum(_tensor_bytes(p) for p in parameters)
