"""The scikit-learn bundled digits: the real data set that needs no download.

Owns the fixed 80/20 train/test split and the 8x8 -> 1x32x32 resize; reads scikit-learn's
bundled file itself (the same arrays ``sklearn.datasets.load_digits`` returns, without importing
scikit-learn: seconds per process) and never touches the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distbelief.data.base import ArrayDataset, channel_stats, normalize_channels

NUM_CLASSES = 10
IMAGE_SIZE = 32
TRAIN_FRACTION = 0.8
# A constant, not the run seed: the test split must be the same in every run.
_SPLIT_SEED = 20121203
_MAX_PIXEL_VALUE = 16.0


def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 images (0..16) and labels of scikit-learn's ``digits.csv.gz``: one row per
    image, 64 pixels then the label."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the digits data set needs scikit-learn installed")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    rows = np.loadtxt(path, delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)


def load_digits(split: str) -> ArrayDataset:
    """Loads one split of the 1797 scikit-learn digits as 1x32x32 images.

    Pixels (0..16) are scaled to [0, 1], upsampled bilinearly to 32x32 and normalised with the
    train split's mean and std. The split is a fixed seeded permutation: the first 80% is train.

    Args:
        split: "train" or "test".

    Returns:
        The split as an ArrayDataset named "digits".

    Raises:
        ValueError: If split is not "train" or "test".
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be one of ('train', 'test'), got {split!r}")
    pixels, targets = _bundled_digits()
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / _MAX_PIXEL_VALUE
    images = F.interpolate(
        images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    labels = torch.tensor(targets, dtype=torch.int64)
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    permutation = torch.randperm(len(labels), generator=generator)
    num_train = int(TRAIN_FRACTION * len(labels))
    train_idx, test_idx = permutation[:num_train], permutation[num_train:]
    mean, std = channel_stats(images[train_idx])
    chosen = train_idx if split == "train" else test_idx
    return ArrayDataset(
        images=normalize_channels(images[chosen], mean, std),
        labels=labels[chosen],
        num_classes=NUM_CLASSES,
        name="digits",
    )
