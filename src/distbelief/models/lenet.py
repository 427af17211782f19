"""LeNet-5 as in the PyTorch CIFAR-10 tutorial, sized for any (C, H, W) input.

Also owns the two helpers every model here shares: argument checks and measuring the flattened
feature size with a dummy forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from distbelief.config import check_count


def check_model_args(input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Raises ValueError unless input_shape is a tuple or list of three ints >= 1 and
    num_classes an int >= 1 (a text or None would fail inside the layers, naming nothing)."""
    shape = tuple(input_shape) if isinstance(input_shape, tuple | list) else ()
    if len(shape) != 3 or not all(type(side) is int and side >= 1 for side in shape):
        raise ValueError(f"input_shape must be (C, H, W) of integers >= 1, got {input_shape!r}")
    check_count("num_classes", num_classes)


def num_flat_features(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Number of values `features` outputs per sample, found with one dummy forward pass.

    Raises:
        ValueError: If input_shape is too small for the layers of `features`.
    """
    try:
        with torch.no_grad():
            output = features(torch.zeros(1, *input_shape))
    except RuntimeError as e:
        raise ValueError(f"input_shape {input_shape} is too small for this model: {e}") from e
    return output[0].numel()


class LeNet(nn.Module):
    """conv(C,6,5)-relu-maxpool2-conv(6,16,5)-relu-maxpool2-fc120-relu-fc84-relu-fc.

    For a (3, 32, 32) input and 10 classes it has 62006 parameters, as in the tutorial.

    Args:
        input_shape: (C, H, W) of one input; H and W must be at least 16.
        num_classes: Number of output logits.

    Raises:
        ValueError: If input_shape or num_classes is invalid, or the input is too small.
    """

    # The children whose composition is forward(), in order: model parallelism splits the
    # model into partitions along them (distbelief.pipeline.layers).
    pipeline_order = ("features", "classifier")

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        check_model_args(input_shape, num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(num_flat_features(self.features, input_shape), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (B, C, H, W) images to (B, num_classes) logits."""
        return self.classifier(self.features(x))
