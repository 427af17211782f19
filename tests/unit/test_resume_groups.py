"""Resuming a model-parallel run: its shards' checkpoints live in one folder per parameter
group (``checkpoints/group-stageI/``); they are found and checked before anything starts, and
a corrupt one is refused naming its file."""

from __future__ import annotations

import pytest
import torch

from distbelief.config import JobConfig
from distbelief.errors import CheckpointError
from distbelief.launch.resume import read_run_for_resume
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server.checkpoint import save_checkpoint
from distbelief.sharding import TensorSpec

SPECS = [TensorSpec("3.weight", (4, 2), torch.float32)]


def _run_with_group_checkpoints(run_dir) -> None:
    config = JobConfig.from_fields(
        {"pipeline.num_partitions": 2, "pipeline.split_points": (3,), "cluster.num_shards": 1}
    )
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json())
    for group in ("stage0", "stage1"):
        shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
        shard.initialize(SPECS, [torch.arange(8, dtype=torch.float32)])
        save_checkpoint(shard.snapshot(), run_dir / "checkpoints" / f"group-{group}")


def test_a_run_whose_checkpoints_are_in_group_folders_resumes(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    config = read_run_for_resume(run_dir)
    assert config.pipeline.split_points == (3,)
    assert config.reporting.out_dir == str(run_dir)


def test_a_corrupt_group_checkpoint_is_refused_by_name(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    [tensors] = (run_dir / "checkpoints" / "group-stage1").glob("*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"oops")
    with pytest.raises(CheckpointError, match=f"{tensors}: corrupt"):
        read_run_for_resume(run_dir)
