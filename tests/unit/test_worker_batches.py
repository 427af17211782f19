"""A worker's batches: a batch larger than the worker's share of the data is an error naming
--batch-size, not a loop over empty passes that never reaches --steps."""

from __future__ import annotations

import pytest
import torch

from distbelief.config import JobConfig
from distbelief.data import ArrayDataset
from distbelief.worker import worker_batches


def _dataset(num_examples: int) -> ArrayDataset:
    return ArrayDataset(
        torch.zeros(num_examples, 1, 4, 4), torch.zeros(num_examples, dtype=torch.long), 10, "tiny"
    )


def test_steps_run_over_as_many_passes_as_they_need():
    config = JobConfig.from_fields({"optimizer.batch_size": 4, "optimizer.steps": 7})
    batches = list(worker_batches(config, _dataset(10), torch.arange(10)))
    assert len(batches) == 7 and all(images.shape[0] == 4 for images, _ in batches)


def test_a_batch_larger_than_the_workers_share_is_named():
    config = JobConfig.from_fields({"optimizer.batch_size": 16, "optimizer.steps": 3})
    with pytest.raises(ValueError, match=r"--batch-size: a batch of 16 examples is more than"):
        list(worker_batches(config, _dataset(10), torch.arange(10)))
