"""Reusable tensors keyed by micro-batch index: a stage's receive buffers and gradient outboxes.

Each micro-batch index gets one tensor, allocated the first time it is needed and handed out
again for every later step while the dtype and shape stay the same, so a warm pipeline
allocates nothing per micro-batch.
"""

from __future__ import annotations

import torch


class MicroBuffers:
    """One tensor per micro-batch index (not thread-safe: one owner thread at a time)."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, micro: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The buffer for ``micro``: the one it had if it is of ``dtype`` and ``shape``, else a
        new one that replaces it (its contents undefined)."""
        buffer = self._buffers.get(micro)
        if buffer is None or buffer.dtype != dtype or tuple(buffer.shape) != tuple(shape):
            buffer = torch.empty(shape, dtype=dtype)
            self._buffers[micro] = buffer
        return buffer
