"""A wide fully connected network, big enough that splitting it across stages (model
parallelism) visibly cuts each process's memory."""

from __future__ import annotations

from distbelief.models.mlp import MLP

WIDE_HIDDEN_SIZES = (2048, 2048, 2048, 2048)


class WideMLP(MLP):
    """An MLP with four hidden layers of width 2048 (about 14 million parameters for a
    (1, 28, 28) input and 10 classes).

    Args:
        input_shape: (C, H, W) of one input.
        num_classes: Number of output logits.

    Raises:
        ValueError: If input_shape or num_classes is invalid.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(input_shape, num_classes, hidden_sizes=WIDE_HIDDEN_SIZES)
