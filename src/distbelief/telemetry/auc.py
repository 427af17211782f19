"""Exact ROC AUC of binary scores, for click-through-rate evaluation.

Owns the metric only: a pure function of two tensors, with no model, data set or I/O.
"""

from __future__ import annotations

import torch


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative.

    Computed exactly as the Mann-Whitney U statistic over ranks, with tied scores given their
    average rank (so a tie between a positive and a negative counts one half). One sort, no
    thresholds, so it matches ``sklearn.metrics.roc_auc_score``.

    Args:
        scores: 1-D tensor of real scores (logits or probabilities; only the order matters).
        labels: 1-D tensor of the same length, values 0/1 (any dtype, bool included).

    Returns:
        The AUC in [0, 1].

    Raises:
        ValueError: If the shapes differ or are not 1-D, a score is NaN, a label is not 0 or 1,
            or only one class is present (the AUC is then undefined).
    """
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1-D of one length, got shapes {tuple(scores.shape)} "
            f"and {tuple(labels.shape)}"
        )
    # float64 so that ranks and their sums stay exact well past 2**24 samples.
    scores = scores.detach().to(torch.float64).cpu()
    labels = labels.detach().cpu()
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    positive = labels == 1
    if not bool((positive | (labels == 0)).all()):
        raise ValueError("labels must all be 0 or 1")
    num_positive = int(positive.sum())
    num_negative = len(labels) - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError(
            f"ROC AUC is undefined with only one class present ({num_positive} positive, "
            f"{num_negative} negative labels)"
        )
    sorted_scores, order = torch.sort(scores)
    _, tie_counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    # 1-based rank of the last member of each tie group, minus half the group's extent, is the
    # group's average rank.
    last_ranks = tie_counts.cumsum(0).to(torch.float64)
    average_ranks = last_ranks - (tie_counts.to(torch.float64) - 1.0) / 2.0
    ranks = average_ranks.repeat_interleave(tie_counts)
    positive_rank_sum = float(ranks[positive[order]].sum())
    u_statistic = positive_rank_sum - num_positive * (num_positive + 1) / 2.0
    return u_statistic / (num_positive * num_negative)
