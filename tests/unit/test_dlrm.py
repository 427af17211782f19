"""Unit tests for distbelief.models.dlrm: shapes, meta-device tables, gradients, learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distbelief.data.ctr import iterate_ctr_batches
from distbelief.data.synthetic_ctr import ground_truth_logits, make_synthetic_ctr
from distbelief.models.dlrm import DLRM
from distbelief.telemetry.auc import roc_auc


def _inputs(batch_size: int, num_dense: int, table_sizes: list[int]) -> tuple:
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(batch_size, num_dense, generator=generator)
    sparse = torch.stack(
        [torch.randint(0, size, (batch_size,), generator=generator) for size in table_sizes], 1
    )
    return dense, sparse


@pytest.mark.parametrize(("num_dense", "table_sizes"), [(13, [50, 7, 300]), (0, [40, 9])])
def test_forward_gives_one_logit_per_sample(num_dense: int, table_sizes: list[int]) -> None:
    model = DLRM(num_dense, table_sizes, embedding_dim=8, bottom_hidden=(16,), top_hidden=(8,))
    logits = model(*_inputs(5, num_dense, table_sizes))
    assert logits.shape == (5,) and logits.dtype == torch.float32
    assert (model.bottom is None) == (num_dense == 0)
    num_vectors = len(table_sizes) + (1 if num_dense else 0)
    num_pairs = num_vectors * (num_vectors - 1) // 2
    first_top = model.top[0]
    assert first_top.in_features == num_pairs + (8 if num_dense else 0)


def test_tables_are_sum_embedding_bags_with_dlrm_init() -> None:
    torch.manual_seed(0)
    model = DLRM(3, [100, 10_000], embedding_dim=4)
    assert isinstance(model.tables, nn.ModuleList)
    for table, size in zip(model.tables, [100, 10_000], strict=True):
        assert isinstance(table, nn.EmbeddingBag) and table.mode == "sum"
        assert table.weight.shape == (size, 4)
        assert float(table.weight.detach().abs().max()) <= math.sqrt(1 / size)
    torch.manual_seed(0)
    again = DLRM(3, [100, 10_000], embedding_dim=4)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )


def test_meta_embeddings_allocate_nothing_and_dense_layers_are_real() -> None:
    model = DLRM(13, [20_000_000] * 2, embedding_device="meta")
    assert all(table.weight.is_meta for table in model.tables)
    assert model.tables[0].weight.shape == (20_000_000, 16)
    dense_parameters = [p for name, p in model.named_parameters() if not name.startswith("tables")]
    assert dense_parameters and not any(p.is_meta for p in dense_parameters)


def test_a_table_can_be_swapped_for_a_module_taking_b_by_1_ids() -> None:
    model = DLRM(2, [10, 10], embedding_dim=4, embedding_device="meta")
    seen: list[tuple[int, ...]] = []

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = nn.Embedding(10, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(ids.shape))
            return self.rows(ids[:, 0])

    model.tables = nn.ModuleList([Lookup(), Lookup()])
    assert model(*_inputs(3, 2, [10, 10])).shape == (3,)
    assert seen == [(3, 1), (3, 1)]


def test_gradients_reach_every_layer_and_only_the_rows_looked_up() -> None:
    torch.manual_seed(0)
    model = DLRM(4, [30, 30, 30], embedding_dim=8)
    dense, sparse = _inputs(6, 4, [30, 30, 30])
    nn.functional.binary_cross_entropy_with_logits(
        model(dense, sparse), torch.tensor([1.0, 0, 1, 0, 1, 0])
    ).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name
    for t, table in enumerate(model.tables):
        touched = torch.nonzero(table.weight.grad.abs().sum(dim=1)).flatten()
        assert set(touched.tolist()) <= set(sparse[:, t].tolist())


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, [10]), {}, "two vectors"),
        ((-1, [10, 10]), {}, "num_dense"),
        ((2, [10, 0]), {}, "table_sizes"),
        ((2, [10]), {"embedding_dim": 0}, "embedding_dim"),
        ((2, [10]), {"top_hidden": (0,)}, "top_hidden"),
        ((2, [10, 10]), {"embedding_device": "meta", "real_tables": (2,)}, "real_tables"),
        ((2, [10, 10]), {"embedding_device": "meta", "real_tables": (-1,)}, "real_tables"),
        ((2, [10, 10]), {"embedding_device": "meta", "real_tables": (True,)}, "real_tables"),
    ],
)
def test_argument_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DLRM(*args, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((13.0, [10, 10]), {}, r"^num_dense must be an int, got 13\.0$"),
        ((True, [10, 10]), {}, r"^num_dense must be an int, got True$"),
        ((2, [10.5, 10]), {}, r"^table_sizes must be a list or tuple of ints"),
        ((2, "ab"), {}, r"^table_sizes must be a list or tuple of ints, got 'ab'$"),
        ((2, [10, 10]), {"embedding_dim": 4.0}, r"^embedding_dim must be an int, got 4\.0$"),
        ((2, [10, 10]), {"bottom_hidden": 8}, r"^bottom_hidden must be a list or tuple of ints"),
        ((2, [10, 10]), {"top_hidden": (8.5,)}, r"^top_hidden must be a list or tuple of ints"),
    ],
)
def test_a_size_that_is_no_int_is_named(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        DLRM(*args, **kwargs)


@pytest.mark.parametrize(
    ("dense_shape", "sparse_shape", "match"),
    [
        ((5, 3), (5, 3), r"^sparse must be \(batch, 2\): one id per table, got \(5, 3\)$"),
        ((5, 3), (5, 1), r"^sparse must be \(batch, 2\)"),
        ((5, 3), (5,), r"^sparse must be \(batch, 2\)"),
        ((4, 3), (5, 2), r"^dense and sparse must have one row per sample"),
    ],
)
def test_inputs_of_another_shape_are_refused(dense_shape, sparse_shape, match) -> None:
    model = DLRM(3, [10, 10], embedding_dim=4)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(dense_shape), torch.zeros(sparse_shape, dtype=torch.int64))


def test_a_table_torch_cannot_size_is_refused_by_its_index() -> None:
    # 2**63 // 64 rows of 16 float32 are 2**63 bytes, one past what torch sizes a tensor to.
    largest = 2**63 // 64 - 1
    model = DLRM(0, [largest, 10], embedding_device="meta")
    assert model.tables[0].weight.shape == (largest, 16)
    with pytest.raises(ValueError, match=f"^table 1 of {largest + 1} rows is too large") as e:
        DLRM(0, [10, largest + 1], embedding_device="meta")
    assert f"{largest} rows of that width" in str(e.value)


def test_learns_the_synthetic_click_log() -> None:
    """One epoch of Adam on 20k synthetic samples lifts test AUC well above chance (0.68;
    0.71 with 60k samples)."""
    options = {"num_tables": 8, "table_size": 1000}
    train = make_synthetic_ctr("train", 20_000, **options)
    test = make_synthetic_ctr("test", 10_000, **options)
    torch.manual_seed(0)
    model = DLRM(train.num_dense, train.table_sizes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for dense, sparse, labels in iterate_ctr_batches(
        train, torch.arange(len(train)), 256, seed=0, epoch=0
    ):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = roc_auc(model(test.dense, test.sparse), test.labels)
    ceiling = roc_auc(ground_truth_logits(test), test.labels)
    assert 0.65 < learned < ceiling, (learned, ceiling)
