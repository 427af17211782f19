"""Unit tests for the click-log record, its batching, and the synthetic click log."""

from __future__ import annotations

import pytest
import torch

from distbelief.data.base import ArrayDataset, iterate_batches
from distbelief.data.ctr import CtrDataset, iterate_ctr_batches
from distbelief.data.synthetic_ctr import ground_truth_logits, make_synthetic_ctr
from distbelief.telemetry.auc import roc_auc


def _dataset(num_samples: int = 10, num_dense: int = 3, table_sizes=(100, 7)) -> CtrDataset:
    ids = torch.arange(num_samples).unsqueeze(1) % torch.tensor(table_sizes)
    return CtrDataset(
        dense=torch.arange(num_samples * num_dense, dtype=torch.float32).view(
            num_samples, num_dense
        ),
        sparse=ids,
        labels=(torch.arange(num_samples) % 2).to(torch.float32),
        name="toy",
        table_sizes=tuple(table_sizes),
    )


def test_dataset_shapes_and_length() -> None:
    dataset = _dataset()
    assert len(dataset) == 10
    assert (dataset.num_dense, dataset.num_tables) == (3, 2)
    assert _dataset(num_dense=0).num_dense == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dense": torch.zeros(10, 3, dtype=torch.float64)}, "dense"),
        ({"dense": torch.zeros(10)}, "dense"),
        ({"sparse": torch.zeros(10, 2, dtype=torch.int32)}, "sparse"),
        ({"labels": torch.zeros(10, dtype=torch.int64)}, "labels"),
        ({"labels": torch.zeros(9)}, "labels has 9"),
        ({"dense": torch.zeros(9, 3)}, "dense has 9"),
        ({"labels": torch.full((10,), 0.5)}, "labels must all be 0.0 or 1.0"),
        ({"table_sizes": (100,)}, "table_sizes"),
        ({"table_sizes": (100, 0)}, "table_sizes"),
        ({"table_sizes": (100, 5)}, "table 1 span"),
        ({"sparse": torch.tensor([[-1, 0]] * 10)}, "table 0 span"),
    ],
)
def test_dataset_validation_names_the_field(changes: dict, match: str) -> None:
    fields = {
        name: getattr(_dataset(), name)
        for name in ("dense", "sparse", "labels", "name", "table_sizes")
    }
    with pytest.raises(ValueError, match=match):
        CtrDataset(**{**fields, **changes})


def test_batches_follow_the_same_order_as_iterate_batches() -> None:
    num_samples = 23
    dataset = _dataset(num_samples, table_sizes=(num_samples, 7))
    images = ArrayDataset(
        images=torch.zeros(num_samples, 1, 1, 1),
        labels=torch.arange(num_samples),
        num_classes=num_samples,
        name="index",
    )
    indices = torch.arange(3, num_samples)
    for epoch in (0, 1):
        for drop_last in (True, False):
            ctr = iterate_ctr_batches(dataset, indices, 3, seed=5, epoch=epoch, drop_last=drop_last)
            reference = iterate_batches(
                images, indices, 3, seed=5, epoch=epoch, drop_last=drop_last
            )
            ctr_ids = [sparse[:, 0].tolist() for _, sparse, _ in ctr]
            assert ctr_ids == [labels.tolist() for _, labels in reference]
            assert sum(map(len, ctr_ids)) == (18 if drop_last else 20)


def test_batches_keep_rows_together_and_handle_the_last_partial_batch() -> None:
    dataset = _dataset(10)
    batches = list(
        iterate_ctr_batches(dataset, torch.arange(10), 4, seed=0, epoch=0, drop_last=False)
    )
    assert [len(labels) for _, _, labels in batches] == [4, 4, 2]
    for dense, sparse, labels in batches:
        rows = sparse[:, 0]
        assert torch.equal(dense, dataset.dense[rows])
        assert torch.equal(labels, dataset.labels[rows])
    assert sorted(torch.cat([s[:, 0] for _, s, _ in batches]).tolist()) == list(range(10))
    dropped = list(iterate_ctr_batches(dataset, torch.arange(10), 4, seed=0, epoch=0))
    assert [len(labels) for _, _, labels in dropped] == [4, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"indices": torch.zeros(3)}, "indices"),
        ({"seed": -1}, "seed"),
    ],
)
def test_batch_argument_errors(kwargs: dict, match: str) -> None:
    arguments = {"indices": torch.arange(10), "batch_size": 2, "seed": 0, "epoch": 0, **kwargs}
    indices, batch_size = arguments.pop("indices"), arguments.pop("batch_size")
    with pytest.raises(ValueError, match=match):
        iterate_ctr_batches(_dataset(), indices, batch_size, **arguments)


def test_synthetic_is_deterministic_and_splits_differ() -> None:
    first = make_synthetic_ctr("train", 500, seed=3)
    again = make_synthetic_ctr("train", 500, seed=3)
    test = make_synthetic_ctr("test", 500, seed=3)
    assert torch.equal(first.sparse, again.sparse) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.sparse, test.sparse)
    assert first.dense.shape == (500, 13) and first.sparse.shape == (500, 26)
    assert first.table_sizes == (10_000,) * 26 and first.name == "synthetic-ctr"


def test_synthetic_splits_share_the_ground_truth_and_seeds_do_not() -> None:
    train = make_synthetic_ctr("train", 2000, num_tables=3, table_size=50, num_dense=0)
    test = make_synthetic_ctr("test", 2000, num_tables=3, table_size=50, num_dense=0)
    # The same id triple gets the same ground-truth logit in both splits.
    train_logits = {
        tuple(ids): float(logit)
        for ids, logit in zip(train.sparse.tolist(), ground_truth_logits(train), strict=True)
    }
    shared = [
        (train_logits[tuple(ids)], float(logit))
        for ids, logit in zip(test.sparse.tolist(), ground_truth_logits(test), strict=True)
        if tuple(ids) in train_logits
    ]
    assert len(shared) > 10
    assert all(a == b for a, b in shared)
    other = make_synthetic_ctr("train", 2000, num_tables=3, table_size=50, num_dense=0, seed=1)
    assert not torch.equal(ground_truth_logits(train), ground_truth_logits(train, seed=1))
    assert not torch.equal(train.sparse, other.sparse)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_dense": 0},
        {"num_tables": 2, "table_size": 100},
        {"table_size": 1_000_000, "zipf_exponent": 1.0},
        {"zipf_exponent": 1.4, "seed": 7},
    ],
)
def test_synthetic_click_rate_and_ground_truth_auc(kwargs: dict) -> None:
    dataset = make_synthetic_ctr("test", 20_000, **kwargs)
    assert 0.1 <= float(dataset.labels.mean()) <= 0.3
    assert int(dataset.sparse.max()) < dataset.table_sizes[0]
    ceiling = roc_auc(ground_truth_logits(dataset, seed=kwargs.get("seed", 0)), dataset.labels)
    assert ceiling > 0.75


def test_synthetic_ids_are_zipf_skewed_and_scattered() -> None:
    dataset = make_synthetic_ctr("train", 50_000, num_tables=1, table_size=10_000, num_dense=0)
    counts = torch.bincount(dataset.sparse[:, 0], minlength=10_000).sort(descending=True).values
    # Power law with exponent ~1: the top id is far more frequent than the 100th.
    assert counts[0] > 20 * counts[99]
    hottest = torch.bincount(dataset.sparse[:, 0]).topk(10).indices
    assert int(hottest.max()) - int(hottest.min()) > 1000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "valid"}, "split"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_tables": 0}, "num_tables"),
        ({"table_size": 0}, "table_size"),
        ({"table_size": 2**31 + 1}, "table_size"),
        ({"num_dense": -1}, "num_dense"),
        ({"zipf_exponent": 0.0}, "zipf_exponent"),
        ({"seed": -1}, "seed"),
    ],
)
def test_synthetic_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_synthetic_ctr(**{"split": "train", **kwargs})
