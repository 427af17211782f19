"""Click-through-rate data held in memory: dense features, one sparse id per table, 0/1 labels.

Owns the ``CtrDataset`` record, its validation and seeded batching. Knows nothing about files,
embedding tables or parameter servers; the loaders and the synthetic generator produce it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from distbelief.data.base import epoch_order


@dataclass(frozen=True)
class CtrDataset:
    """A click log: per sample, dense features, one categorical id per table and a 0/1 label.

    Attributes:
        dense: float32 tensor of shape (N, num_dense); num_dense may be 0.
        sparse: int64 tensor of shape (N, num_tables), one id per table per sample. Ids need
            not be contiguous (hashed ids are fine) but lie in [0, table_sizes[t]) for table t.
        labels: float32 tensor of shape (N,), values 0.0 or 1.0.
        name: Data set name, e.g. "criteo".
        table_sizes: One entry per table: the bound the ids of that table are below (the
            vocabulary size, or the size of the hash space for hashed ids).
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    name: str
    table_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_tensor("dense", self.dense, torch.float32, 2)
        _check_tensor("sparse", self.sparse, torch.int64, 2)
        _check_tensor("labels", self.labels, torch.float32, 1)
        num_samples = len(self.labels)
        if len(self.dense) != num_samples or len(self.sparse) != num_samples:
            raise ValueError(
                f"dense has {len(self.dense)} rows and sparse {len(self.sparse)}, but labels "
                f"has {num_samples}"
            )
        if not bool(((self.labels == 0) | (self.labels == 1)).all()):
            raise ValueError("labels must all be 0.0 or 1.0")
        if len(self.table_sizes) != self.sparse.shape[1] or min(self.table_sizes, default=1) < 1:
            raise ValueError(
                f"table_sizes must hold one size >= 1 per sparse column "
                f"({self.sparse.shape[1]}), got {self.table_sizes}"
            )
        _check_ids(self.sparse, self.table_sizes)

    @property
    def num_dense(self) -> int:
        """Number of dense features per sample."""
        return int(self.dense.shape[1])

    @property
    def num_tables(self) -> int:
        """Number of categorical features (embedding tables) per sample."""
        return int(self.sparse.shape[1])

    def __len__(self) -> int:
        return len(self.labels)


def _check_tensor(field: str, tensor: torch.Tensor, dtype: torch.dtype, num_dims: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.dim() != num_dims:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
        dtype_got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(
            f"{field} must be a {num_dims}-D {dtype} tensor, got dtype={dtype_got} shape={shape}"
        )


def _check_ids(sparse: torch.Tensor, table_sizes: tuple[int, ...]) -> None:
    if len(sparse) == 0:
        return
    # One reduction per column, not a Python loop over samples: cheap even for millions of rows.
    low = sparse.amin(dim=0)
    high = sparse.amax(dim=0)
    bounds = torch.tensor(table_sizes, dtype=torch.int64)
    bad = torch.nonzero((low < 0) | (high >= bounds)).flatten()
    if len(bad):
        table = int(bad[0])
        raise ValueError(
            f"sparse ids of table {table} span [{int(low[table])}, {int(high[table])}], "
            f"outside [0, {table_sizes[table]}) given by table_sizes"
        )


def iterate_ctr_batches(
    dataset: CtrDataset,
    indices: torch.Tensor,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch of (dense, sparse, labels) batches over `indices`, in a seeded order.

    The order is the one ``distbelief.data.iterate_batches`` uses for the same (seed, epoch,
    indices): one seeded shuffle per epoch, then consecutive slices of batch_size.

    Args:
        dataset: The data set to draw from.
        indices: 1-D integer tensor of the sample indices to visit, e.g. from worker_indices.
        batch_size: Samples per batch, >= 1.
        seed: Run seed, >= 0.
        epoch: Epoch number, >= 0; a new epoch gives a new order.
        drop_last: Drop the final batch if it has fewer than batch_size samples.

    Returns:
        An iterator of (dense, sparse, labels) with shapes (B, num_dense), (B, num_tables)
        and (B,).

    Raises:
        ValueError: If batch_size < 1, seed or epoch < 0, or indices is not a 1-D integer tensor.
    """
    # Validated here, not inside the generator, so bad arguments fail at the call site.
    order = epoch_order(indices, batch_size, seed, epoch)
    return _ctr_batches(dataset, order, batch_size, drop_last)


def _ctr_batches(
    dataset: CtrDataset, order: torch.Tensor, batch_size: int, drop_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if drop_last and len(batch) < batch_size:
            return
        yield dataset.dense[batch], dataset.sparse[batch], dataset.labels[batch]
