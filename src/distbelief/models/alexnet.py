"""The common CIFAR-sized AlexNet variant (3x3 kernels), for any (C, H, W) input."""

from __future__ import annotations

import torch
from torch import nn

from distbelief.models.lenet import check_model_args, num_flat_features


class AlexNet(nn.Module):
    """Five 3x3 conv layers with three max-pools, then a dropout 4096-4096 classifier.

    features: Conv(C,64,k3,s2,p1) ReLU MaxPool2, Conv(64,192,k3,p1) ReLU MaxPool2,
    Conv(192,384,k3,p1) ReLU, Conv(384,256,k3,p1) ReLU, Conv(256,256,k3,p1) ReLU, MaxPool2.
    classifier: Dropout, Linear(feat,4096), ReLU, Dropout, Linear(4096,4096), ReLU,
    Linear(4096,num_classes).

    Args:
        input_shape: (C, H, W) of one input; H and W must be at least 15.
        num_classes: Number of output logits.
        dropout: Drop probability of both dropout layers.

    Raises:
        ValueError: If input_shape or num_classes is invalid, or the input is too small.
    """

    # The children whose composition is forward(), in order: model parallelism splits the
    # model into partitions along them (distbelief.pipeline.layers).
    pipeline_order = ("features", "classifier")

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.5
    ) -> None:
        super().__init__()
        check_model_args(input_shape, num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(num_flat_features(self.features, input_shape), 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (B, C, H, W) images to (B, num_classes) logits."""
        return self.classifier(self.features(x))
