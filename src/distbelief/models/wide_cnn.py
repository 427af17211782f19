"""A VGG-style convolutional network: most of its compute is in convolutions over the full
image, so its speed per sample hardly depends on the batch size (a micro-batch of 16 runs as
fast per sample as a batch of 128 on a CPU), unlike a wide MLP's, whose small matrix products
are memory-bound. The model for measuring a pipeline's overlap."""

from __future__ import annotations

import torch
from torch import nn

from distbelief.models.lenet import check_model_args, num_flat_features

WIDE_CNN_WIDTHS = (64, 128, 256)
"""Channels of each block of two 3x3 convolutions (each block then halves the image)."""


class WideCNN(nn.Module):
    """Three blocks of two 3x3 convolutions with ReLU and a 2x2 max-pool, then one linear layer
    to the logits.

    Args:
        input_shape: (C, H, W) of one input; H and W must be at least 8.
        num_classes: Number of output logits.

    Raises:
        ValueError: If input_shape or num_classes is invalid, or the input is too small.
    """

    # Its forward is features, then classifier: a pipeline may cut it between any layers.
    pipeline_order = ("features", "classifier")

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        check_model_args(input_shape, num_classes)
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for width in WIDE_CNN_WIDTHS:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(num_flat_features(self.features, input_shape), num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (B, C, H, W) images to (B, num_classes) logits."""
        return self.classifier(self.features(x))
