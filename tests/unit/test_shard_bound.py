"""A new job's --shards is bounded by its model's parameters, as reshard's and a resumed run's
are: past the largest dtype group's elements shard 0 would hold none (of a model-parallel job,
past its smallest partition's: every partition is cut across all the shards)."""

from __future__ import annotations

import pytest
import torch

from distbelief.config import CLICK_MODELS, MODEL_NAMES, JobConfig
from distbelief.data import load_dataset
from distbelief.launch.cli import main
from distbelief.launch.local import LocalCluster
from distbelief.launch.resume_layout import EVERY_MODEL_HAS_MORE_PARAMETERS, model_group_sizes
from distbelief.models import DLRM, build_model


@pytest.fixture
def nothing_starts(monkeypatch):
    def start(*args, **kwargs):
        raise AssertionError("a process was started for a refused job")

    monkeypatch.setattr(LocalCluster, "start", start)


def test_more_shards_than_the_models_parameters_is_refused_before_anything_starts(
    nothing_starts, capsys, tmp_path
):
    run_dir = tmp_path / "run"
    argv = ["train", "--model", "lenet", "--steps", "2", "--out", str(run_dir)]
    assert main([*argv, "--shards", "100000"]) == 2
    [(largest,)] = model_group_sizes(JobConfig.from_fields({"model.name": "lenet"}))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"distbelief train: error: argument --shards: must be at most {largest}, the "
        f"parameters of this run's model: more shards would hold none, got 100000"
    ]
    assert not run_dir.exists()


def test_a_partitioned_job_is_bounded_by_its_smallest_partition(nothing_starts, capsys, tmp_path):
    # Each partition is a parameter group of its own, cut across every shard: past the smallest
    # one's elements some shard would hold none of it (split at 4, the last layer: 1,290).
    fields = {"model.name": "mlp", "pipeline.num_partitions": 2, "pipeline.split_points": [4]}
    [(largest,), (smallest,)] = model_group_sizes(JobConfig.from_fields(fields))
    assert smallest < 5000 < largest
    run_dir = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--partitions", "2", "--split-points", "4"]
    assert main([*argv, "--shards", "5000", "--out", str(run_dir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"distbelief train: error: argument --shards: must be at most {smallest}, the "
        "parameters of this run's smallest partition: more shards would hold none, got 5000"
    ]
    assert not run_dir.exists()


def _largest_group(model: torch.nn.Module) -> int:
    sizes: dict[torch.dtype, int] = {}
    for name, parameter in model.named_parameters():
        if not name.startswith("tables."):  # a click model's rows are the shards' tables
            sizes[parameter.dtype] = sizes.get(parameter.dtype, 0) + parameter.numel()
    return max(sizes.values())


@pytest.mark.parametrize("name", [name for name in MODEL_NAMES if name not in CLICK_MODELS])
def test_every_model_has_more_parameters_than_the_bound_that_skips_building_it(name):
    # digits and synthetic as loaded; MNIST's and CIFAR-10's shapes are fixed.
    loaded = [load_dataset(data, split="test").input_shape for data in ("digits", "synthetic")]
    with torch.device("meta"):
        for shape in [(1, 28, 28), (3, 32, 32), *map(tuple, loaded)]:
            assert _largest_group(build_model(name, shape, 10)) > EVERY_MODEL_HAS_MORE_PARAMETERS


def test_the_smallest_click_model_has_more_parameters_than_the_bound():
    # MovieLens: two tables (users, movies), no dense feature; the narrowest rows.
    for num_dense, tables in [(0, 2), (1, 1), (13, 26)]:
        model = DLRM(num_dense, [10] * tables, embedding_dim=1, embedding_device="meta")
        assert _largest_group(model) > EVERY_MODEL_HAS_MORE_PARAMETERS
