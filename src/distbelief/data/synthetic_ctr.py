"""A synthetic click log with Zipf-distributed ids and a hidden ground-truth model.

Owns the generator and the ground truth. The ground truth depends only on ``seed``, never on
the split, and is a pure function of (seed, table, id): it is hashed, not stored, so a table of
any size costs no memory. Train and test draw different samples from the same ground truth.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distbelief.config import MAX_SYNTHETIC_TABLE_SIZE
from distbelief.data.ctr import CtrDataset

DEFAULT_NUM_SAMPLES = {"train": 100_000, "test": 20_000}
# SeedSequence streams under the seed: one for the ground truth and one per split, so the splits
# share the ground truth but no samples.
_SPLIT_STREAMS = {"train": 1, "test": 2}
_GROUND_TRUTH_STREAM = 0
# Sub-streams of the ground truth, one per use, so that adding one never shifts another.
_OFFSETS_PART = 0
_DENSE_PART = 1
_WEIGHT_PART = 2
_VECTOR_PART = 3
MAX_TABLE_SIZE = MAX_SYNTHETIC_TABLE_SIZE
"""Largest table_size: keeps the id permutation's products inside int64."""

GROUND_TRUTH_RANK = 4
"""Width of the hidden per-id vectors whose pairwise dot products make the interaction term."""
# Standard deviations of the three terms of the logit (over ids drawn uniformly), and the bias
# that puts the click rate near 20% with them, as in display-advertising logs.
_LINEAR_STD = 1.0
_INTERACTION_STD = 1.0
_DENSE_STD = 0.7
_BIAS = -2.0


def make_synthetic_ctr(
    split: str,
    num_samples: int | None = None,
    *,
    num_tables: int = 26,
    table_size: int = 10_000,
    num_dense: int = 13,
    zipf_exponent: float = 1.05,
    seed: int = 0,
) -> CtrDataset:
    """Generates one split of a synthetic click log.

    Ids: per table, a popularity rank r in [1, table_size] follows a power law with density
    proportional to r**-zipf_exponent (a continuous Zipf floored to integers), and ranks map
    to ids through a fixed per-table permutation of [0, table_size), so popular ids are
    scattered over the id range instead of packed at its start. Dense features are N(0, 1).

    Labels: Bernoulli(sigmoid(logit)) with the logit of ``ground_truth_logits``:
    bias + a scalar weight per (table, id) + a linear function of the dense features + the
    pairwise dot products of hidden rank-4 vectors, one per (table, id) and one projected from
    the dense features (the structure a DLRM models). About 15-25% of labels are clicks.

    Args:
        split: "train" or "test".
        num_samples: Number of samples, >= 1; defaults to 100_000 for train, 20_000 for test.
        num_tables: Number of categorical features, >= 1.
        table_size: Ids per table, in [1, 2**31].
        num_dense: Number of dense features, >= 0.
        zipf_exponent: Power-law exponent of id popularity, > 0; larger is more skewed.
        seed: Seed of the ground truth and the samples, >= 0; both splits of one seed share
            the ground truth.

    Returns:
        The split as a CtrDataset named "synthetic-ctr" with table_sizes = (table_size,) per
        table.

    Raises:
        ValueError: If split is unknown or an argument is out of range; the message names it.
    """
    _check_args(split, num_samples, num_tables, table_size, num_dense, zipf_exponent, seed)
    if num_samples is None:
        num_samples = DEFAULT_NUM_SAMPLES[split]
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_STREAMS[split]]))
    )
    ranks = _zipf_ranks(rng.random((num_samples, num_tables)), table_size, zipf_exponent)
    sparse = torch.from_numpy(_ranks_to_ids(ranks, table_size, seed))
    dense = torch.from_numpy(rng.standard_normal((num_samples, num_dense), dtype=np.float32))
    logits = _logits(dense, sparse, seed)
    clicks = rng.random(num_samples) < torch.sigmoid(logits).numpy()
    return CtrDataset(
        dense=dense,
        sparse=sparse,
        labels=torch.from_numpy(clicks.astype(np.float32)),
        name="synthetic-ctr",
        table_sizes=(table_size,) * num_tables,
    )


def ground_truth_logits(dataset: CtrDataset, *, seed: int = 0) -> torch.Tensor:
    """The hidden model's logits for the samples of a synthetic click log (``load_dataset(
    "synthetic-ctr", ...)``), the model that drew its clicks.

    Their ROC AUC against the data set's labels (``telemetry.roc_auc``) is the ceiling a learned
    model can reach.

    Args:
        dataset: A split of "synthetic-ctr" (or one made by make_synthetic_ctr); any other data
            set gives meaningless numbers.
        seed: The seed the split was made with (load_dataset's: 0).

    Returns:
        float32 tensor of shape (N,); sigmoid of it is each sample's click probability.
    """
    return _logits(dataset.dense, dataset.sparse, seed)


def _check_args(
    split: str,
    num_samples: int | None,
    num_tables: int,
    table_size: int,
    num_dense: int,
    zipf_exponent: float,
    seed: int,
) -> None:
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be one of {tuple(_SPLIT_STREAMS)}, got {split!r}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_tables < 1:
        raise ValueError(f"num_tables must be >= 1, got {num_tables}")
    if not 1 <= table_size <= MAX_TABLE_SIZE:
        raise ValueError(f"table_size must be in [1, {MAX_TABLE_SIZE}], got {table_size}")
    if num_dense < 0:
        raise ValueError(f"num_dense must be >= 0, got {num_dense}")
    if not zipf_exponent > 0:
        raise ValueError(f"zipf_exponent must be > 0, got {zipf_exponent}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _zipf_ranks(uniform: np.ndarray, table_size: int, exponent: float) -> np.ndarray:
    """Inverse CDF of the density x**-exponent on [1, table_size + 1), floored: int64 ranks."""
    upper = table_size + 1.0
    if abs(exponent - 1.0) < 1e-9:
        points = upper**uniform
    else:
        power = 1.0 - exponent
        points = (1.0 + uniform * (upper**power - 1.0)) ** (1.0 / power)
    # Rounding can land a point on the open upper end.
    return np.clip(np.floor(points).astype(np.int64), 1, table_size)


def _ranks_to_ids(ranks: np.ndarray, table_size: int, seed: int) -> np.ndarray:
    """id = (stride * (rank - 1) + offset[table]) mod table_size, a bijection per table.

    Scattering keeps the hot ids off one end of the id range, where a range partition of a
    table would put them all on one shard.
    """
    stride = _coprime_stride(table_size)
    rng = _ground_truth_rng(seed, _OFFSETS_PART)
    offsets = rng.integers(0, table_size, size=ranks.shape[1], dtype=np.int64)
    return (stride * (ranks - 1) + offsets) % table_size


def _coprime_stride(table_size: int) -> int:
    """An odd stride near table_size / golden ratio that shares no factor with table_size."""
    stride = max(1, int(table_size * 0.6180339887)) | 1
    while math.gcd(stride, table_size) != 1:
        stride += 2
    return stride


def _ground_truth_seed(seed: int, part: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _GROUND_TRUTH_STREAM, part])


def _ground_truth_rng(seed: int, part: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(_ground_truth_seed(seed, part)))


def _logits(dense: torch.Tensor, sparse: torch.Tensor, seed: int) -> torch.Tensor:
    num_dense, num_tables = dense.shape[1], sparse.shape[1]
    num_vectors = num_tables + (1 if num_dense else 0)
    num_pairs = num_vectors * (num_vectors - 1) // 2
    # Scales that give each term its target std: a sum of num_tables U(-a, a) weights has
    # variance num_tables * a**2 / 3; a dot product of two rank-k U(-c, c) vectors has
    # variance k * (c**2 / 3) ** 2, and the pairs are uncorrelated.
    weight_scale = _LINEAR_STD * math.sqrt(3.0 / num_tables)
    vector_scale = (9.0 * _INTERACTION_STD**2 / max(num_pairs, 1) / GROUND_TRUTH_RANK) ** 0.25
    ids = sparse.numpy()
    weights = _hashed_uniform(ids, _ground_truth_seed(seed, _WEIGHT_PART), 1)[..., 0]
    weights = weights * weight_scale
    vectors = torch.from_numpy(
        _hashed_uniform(ids, _ground_truth_seed(seed, _VECTOR_PART), GROUND_TRUTH_RANK)
    )
    vectors = vectors * vector_scale
    logits = _BIAS + torch.from_numpy(weights).sum(dim=1)
    if num_dense:
        rng = _ground_truth_rng(seed, _DENSE_PART)
        dense_weights = rng.standard_normal(num_dense) * _DENSE_STD / math.sqrt(num_dense)
        projection = rng.standard_normal((num_dense, GROUND_TRUTH_RANK))
        # U(-c, c) has variance c**2 / 3; the projected dense vector matches it per component.
        projection *= vector_scale / math.sqrt(3.0 * num_dense)
        logits = logits + dense @ torch.from_numpy(dense_weights.astype(np.float32))
        dense_vector = dense @ torch.from_numpy(projection.astype(np.float32))
        vectors = torch.cat([vectors, dense_vector.unsqueeze(1)], dim=1)
    # Sum over pairs i < j of <v_i, v_j> is (|sum v|^2 - sum |v|^2) / 2: linear in the count.
    total = vectors.sum(dim=1)
    interaction = 0.5 * (total.square().sum(dim=1) - vectors.square().sum(dim=(1, 2)))
    return (logits + interaction).to(torch.float32)


def _mix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection on uint64 in which every output bit depends on
    every input bit (numpy's uint64 arithmetic wraps, which the mix relies on)."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _hashed_uniform(ids: np.ndarray, key: np.random.SeedSequence, width: int) -> np.ndarray:
    """U(-1, 1) values of shape ids.shape + (width,), a fixed function of (key, column, id);
    width <= 4, from 16-bit slices of one 64-bit hash per (column, id)."""
    assert 1 <= width <= 4
    column_keys = key.generate_state(ids.shape[1], dtype=np.uint64)
    # The golden-ratio multiplier spreads consecutive ids before the mix (as splitmix64 does).
    hashes = _mix64(ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + column_keys)
    shifts = np.arange(width, dtype=np.uint64) * np.uint64(16)
    slices = (hashes[..., None] >> shifts) & np.uint64(0xFFFF)
    # Midpoints of 65536 equal bins: symmetric around 0, so the mean is exactly 0.
    return ((slices.astype(np.float32) + 0.5) / 32768.0 - 1.0).astype(np.float32)
