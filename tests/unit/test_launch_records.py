"""A resumed run's folder holds the records of its own launch only: ``pids.json`` and a Ray
launch's ``ray.json`` name processes of the last launch, gone by then."""

from __future__ import annotations

import json

import torch

from distbelief.config import JobConfig
from distbelief.launch.job import _prepare
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server.checkpoint import save_checkpoint
from distbelief.sharding import TensorSpec


def test_a_resume_drops_the_last_launchs_process_records(tmp_path):
    """A Ray run resumed by the local launcher kept its ray.json: the old Ray address and pids
    beside the new launch's pids.json."""
    run_dir = tmp_path / "run"
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
    shard.initialize([TensorSpec("w", (2,), torch.float32)], [torch.zeros(2)])
    save_checkpoint(shard.snapshot(), run_dir / "checkpoints")
    config = JobConfig.from_fields({"reporting.out_dir": str(run_dir)})
    (run_dir / "config.json").write_text(config.to_json())
    (run_dir / "ray.json").write_text(json.dumps({"address": "127.0.0.1:6379"}))
    (run_dir / "pids.json").write_text(json.dumps({"shard0": 1}))
    _prepare(config, run_dir, resume=True)
    assert not (run_dir / "ray.json").exists() and not (run_dir / "pids.json").exists()
    assert (run_dir / "config.json").exists() and (run_dir / "checkpoints").is_dir()
