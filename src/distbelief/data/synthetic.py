"""Synthetic 3x32x32 images with learnable labels, for speed runs that need no files.

Owns the generator only: each split comes from a fixed seed, so it is identical in every run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distbelief.data.base import ArrayDataset

NUM_CLASSES = 10
INPUT_SHAPE = (3, 32, 32)
DEFAULT_NUM_SAMPLES = {"train": 4096, "test": 1024}
# Fixed seeds, independent of any run seed. The prototypes are shared by both splits (that is
# what makes the test split predictable from the train split); the samples are not.
_PROTOTYPE_SEED = 7
_SPLIT_SEEDS = {"train": 1, "test": 2}
_PROTOTYPE_GRID = 8
# signal_std**2 + noise_std**2 == 1, so every pixel is ~N(0, 1) and the images come out
# already normalised per channel without a statistics pass.
_SIGNAL_STD = 0.5
_NOISE_STD = math.sqrt(1.0 - _SIGNAL_STD**2)


def _prototypes() -> torch.Tensor:
    """One smooth unit-variance 3x32x32 pattern per class."""
    generator = torch.Generator().manual_seed(_PROTOTYPE_SEED)
    num_channels, height, width = INPUT_SHAPE
    coarse = torch.randn(
        NUM_CLASSES, num_channels, _PROTOTYPE_GRID, _PROTOTYPE_GRID, generator=generator
    )
    # Low-frequency patterns suit convolutions better than per-pixel noise does.
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return smooth / smooth.std()


def make_synthetic(split: str, num_samples: int | None = None) -> ArrayDataset:
    """Generates one split of the synthetic data set.

    Each image is `signal_std * prototype[label] + noise_std * noise`, with labels drawn
    uniformly from 10 classes; a nearest-prototype rule classifies it almost perfectly, so any
    of the models can learn it.

    Args:
        split: "train" or "test".
        num_samples: Number of images, >= 1; defaults to 4096 for train and 1024 for test.

    Returns:
        The split as an ArrayDataset named "synthetic".

    Raises:
        ValueError: If split is unknown or num_samples < 1.
    """
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(_SPLIT_SEEDS)}, got {split!r}")
    if num_samples is None:
        num_samples = DEFAULT_NUM_SAMPLES[split]
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    generator = torch.Generator().manual_seed(_SPLIT_SEEDS[split])
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    noise = torch.randn(num_samples, *INPUT_SHAPE, generator=generator)
    images = _SIGNAL_STD * _prototypes()[labels] + _NOISE_STD * noise
    return ArrayDataset(images=images, labels=labels, num_classes=NUM_CLASSES, name="synthetic")
