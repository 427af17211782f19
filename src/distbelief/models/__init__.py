"""Models for training: the public API and the name -> class dispatch.

Each model takes (input_shape, num_classes) and sizes itself; imports nothing from the
parameter-server packages.
"""

from __future__ import annotations

from torch import nn

from distbelief.config import CLICK_MODELS, MODEL_NAMES
from distbelief.models.alexnet import AlexNet
from distbelief.models.dlrm import DLRM
from distbelief.models.lenet import LeNet, check_model_args
from distbelief.models.mlp import MLP
from distbelief.models.wide_cnn import WideCNN
from distbelief.models.wide_mlp import WideMLP

__all__ = ["DLRM", "MLP", "AlexNet", "LeNet", "WideCNN", "WideMLP", "build_model"]

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "lenet": LeNet,
    "alexnet": AlexNet,
    "mlp": MLP,
    "wide-mlp": WideMLP,
    "wide-cnn": WideCNN,
}
# The config offers exactly the models built here and the click models (the names live there,
# free of torch); a click model is sized by its click log (``worker/ctr.py``).
assert (*_MODEL_CLASSES, *CLICK_MODELS) == MODEL_NAMES


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Builds a freshly initialised model by name.

    Args:
        name: One of ``distbelief.config.MODEL_NAMES``.
        input_shape: (C, H, W) of one input, e.g. ArrayDataset.input_shape.
        num_classes: Number of output logits.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: If name is unknown, or input_shape or num_classes is invalid for the model.
    """
    if name in CLICK_MODELS:
        raise ValueError(f"model {name!r} is sized by a click log, not by input_shape")
    if name not in _MODEL_CLASSES:
        raise ValueError(f"unknown model name {name!r}; choose one of {MODEL_NAMES}")
    check_model_args(input_shape, num_classes)
    return _MODEL_CLASSES[name](tuple(input_shape), num_classes)
