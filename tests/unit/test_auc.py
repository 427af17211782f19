"""Unit tests for distbelief.telemetry.auc against scikit-learn's roc_auc_score."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from distbelief.telemetry.auc import roc_auc


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_scores_with_many_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(2000, generator=generator) < 0.3).to(torch.float32)
    # Few distinct values, so most scores tie, many across the two classes.
    scores = torch.randint(0, 7, (2000,), generator=generator).to(torch.float32) + labels * 0.5
    scores = torch.round(scores)
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_matches_sklearn_on_continuous_scores() -> None:
    generator = torch.Generator().manual_seed(9)
    labels = torch.randint(0, 2, (5000,), generator=generator)
    scores = torch.randn(5000, generator=generator) + labels
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.9], [0, 1], 1.0),
        ([0.9, 0.1], [0, 1], 0.0),
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 1, 0], 0.5),
        ([1.0, 2.0, 2.0, 3.0], [0, 0, 1, 1], 0.875),
        ([-5.0, 1e9, -1e9], [1, 1, 0], 1.0),
    ],
)
def test_small_cases(scores: list[float], labels: list[int], expected: float) -> None:
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected)
    assert roc_auc_score(labels, scores) == pytest.approx(expected)


def test_accepts_bool_labels_and_only_uses_the_order_of_scores() -> None:
    labels = torch.tensor([True, False, True, False, True])
    scores = torch.tensor([0.3, 0.1, 0.8, 0.4, 0.2])
    value = roc_auc(scores, labels)
    assert roc_auc(torch.sigmoid(scores * 10), labels) == pytest.approx(value)
    assert value == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_one_class_is_an_error(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="only one class"):
        roc_auc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor(labels))


def test_empty_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="only one class"):
        roc_auc(torch.zeros(0), torch.zeros(0))


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        (torch.zeros(3), torch.zeros(4), "1-D of one length"),
        (torch.zeros(2, 2), torch.zeros(2, 2), "1-D of one length"),
        (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), "NaN"),
        (torch.tensor([0.1, 0.2]), torch.tensor([0, 2]), "0 or 1"),
    ],
)
def test_bad_inputs_are_errors(scores: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        roc_auc(scores, labels)
