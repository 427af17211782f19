"""In-memory data sets, per-channel normalisation, worker slicing and seeded batching.

Everything here works on whole tensors held in memory (no DataLoader, no worker processes) so
that a batch is one indexing op. Knows nothing about files, downloads or parameter servers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from distbelief.config import check_count


@dataclass(frozen=True)
class ArrayDataset:
    """A labelled image data set held as two tensors.

    Attributes:
        images: float32 tensor of shape (N, C, H, W), normalised per channel with the mean and
            std of the train split.
        labels: int64 tensor of shape (N,), values in [0, num_classes).
        num_classes: Number of classes.
        name: Data set name, e.g. "digits".
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a float32 (N, C, H, W) tensor, got dtype={self.images.dtype} "
                f"shape={tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"labels must be an int64 (N,) tensor, got dtype={self.labels.dtype} "
                f"shape={tuple(self.labels.shape)}"
            )
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"labels has {len(self.labels)} entries but images has {len(self.images)}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape of one image."""
        num_channels, height, width = self.images.shape[1:]
        return (int(num_channels), int(height), int(width))

    def __len__(self) -> int:
        return len(self.labels)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of an (N, C, H, W) tensor.

    Args:
        images: Float tensor of shape (N, C, H, W).

    Returns:
        (mean, std), each a tuple with one float per channel.
    """
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3))
    return tuple(mean.tolist()), tuple(std.tolist())


def normalize_channels(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Returns `(images - mean) / std` per channel of an (N, C, H, W) tensor.

    Args:
        images: Float tensor of shape (N, C, H, W).
        mean: One mean per channel.
        std: One standard deviation per channel, each > 0.

    Raises:
        ValueError: If mean or std do not have one entry per channel, or a std is not > 0.
    """
    num_channels = images.shape[1]
    if len(mean) != num_channels or len(std) != num_channels:
        raise ValueError(f"mean and std need {num_channels} entries, got mean={mean} std={std}")
    if min(std) <= 0:
        raise ValueError(f"std must be > 0 per channel, got std={std}")
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def worker_indices(num_samples: int, rank: int, num_workers: int, seed: int = 0) -> torch.Tensor:
    """The sample indices that worker `rank` of `num_workers` trains on.

    Every worker draws the same seeded permutation of range(num_samples) and takes its own
    contiguous slice of it, so the slices are disjoint, differ in size by at most one, and their
    union over all ranks is exactly range(num_samples). No communication is needed.

    Args:
        num_samples: Size of the data set, >= 0.
        rank: This worker's index, in [0, num_workers).
        num_workers: Number of workers sharing the data set, >= 1.
        seed: Seed of the permutation; must be the same on every worker.

    Returns:
        int64 tensor of this worker's indices (in permuted order).

    Raises:
        ValueError: If num_samples < 0, num_workers < 1 or rank is out of range.
    """
    check_count("num_samples", num_samples, least=0)
    check_count("num_workers", num_workers)
    check_count("seed", seed, least=0)
    if type(rank) is not int or not 0 <= rank < num_workers:
        raise ValueError(f"rank must be in [0, {num_workers}), got {rank!r}")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(num_samples, generator=generator)
    return torch.tensor_split(permutation, num_workers)[rank].clone()


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator whose state depends on both seed and epoch, without collisions.

    Mixing through SeedSequence rather than e.g. `seed + epoch` keeps (seed=0, epoch=1) and
    (seed=1, epoch=0) from producing the same order.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def iterate_batches(
    dataset: ArrayDataset,
    indices: torch.Tensor,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (images, labels) batches over `indices`, in a seeded order.

    The order depends only on (seed, epoch), so a run visits samples in the same order every
    time it is repeated. Batches are made by tensor indexing, with no DataLoader.

    Args:
        dataset: The data set to draw from.
        indices: 1-D integer tensor of the sample indices to visit, e.g. from worker_indices.
        batch_size: Samples per batch, >= 1.
        seed: Run seed, >= 0.
        epoch: Epoch number, >= 0; a new epoch gives a new order.
        drop_last: Drop the final batch if it has fewer than batch_size samples.

    Returns:
        An iterator of (images, labels) with shapes (B, C, H, W) and (B,).

    Raises:
        ValueError: If batch_size < 1, seed or epoch < 0, or indices is not a 1-D integer tensor.
    """
    # Validated here, not inside the generator, so bad arguments fail at the call site.
    return _batches(dataset, epoch_order(indices, batch_size, seed, epoch), batch_size, drop_last)


def epoch_order(indices: torch.Tensor, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """``indices`` in epoch ``epoch``'s seeded order (every data set's batches follow it).

    Raises:
        ValueError: batch_size < 1, seed or epoch < 0, or indices not a 1-D integer tensor.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(
            f"indices must be a 1-D integer tensor, got dtype={indices.dtype} "
            f"shape={tuple(indices.shape)}"
        )
    return indices[torch.randperm(len(indices), generator=_epoch_generator(seed, epoch))]


def _batches(
    dataset: ArrayDataset, order: torch.Tensor, batch_size: int, drop_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if drop_last and len(batch) < batch_size:
            return
        yield dataset.images[batch], dataset.labels[batch]
