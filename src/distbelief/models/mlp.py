"""A fully connected ReLU network over flattened images."""

from __future__ import annotations

import math

import torch
from torch import nn

from distbelief.models.lenet import check_model_args


class MLP(nn.Module):
    """Flatten, then Linear-ReLU per hidden size, then a Linear to the logits.

    Args:
        input_shape: (C, H, W) of one input.
        num_classes: Number of output logits.
        hidden_sizes: Width of each hidden layer, in order.

    Raises:
        ValueError: If input_shape, num_classes or a hidden size is invalid.
    """

    # The children whose composition is forward(), in order: model parallelism splits the
    # model into partitions along them (distbelief.pipeline.layers).
    pipeline_order = ("layers",)

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        hidden_sizes: tuple[int, ...] = (256, 128),
    ) -> None:
        super().__init__()
        check_model_args(input_shape, num_classes)
        sizes_ok = isinstance(hidden_sizes, tuple | list) and all(
            type(size) is int and size >= 1 for size in hidden_sizes
        )
        if not sizes_ok:
            raise ValueError(f"hidden_sizes must all be integers >= 1, got {hidden_sizes!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = math.prod(input_shape)
        for size in hidden_sizes:
            layers += [nn.Linear(in_features, size), nn.ReLU()]
            in_features = size
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (B, C, H, W) images to (B, num_classes) logits."""
        return self.layers(x)
