"""A run folder's records: a resumed run's holds those of its own launch only (``pids.json``
and a Ray launch's ``ray.json`` name processes of the last launch, gone by then), and a run's
folder or file found there as something else is refused before anything is written."""

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
    # A failed launch's traceback: a resume that ends done looked failed beside it.
    (run_dir / "coordinator-traceback.txt").write_text("Traceback ...")
    _prepare(config, run_dir, resume=True)
    assert not (run_dir / "ray.json").exists() and not (run_dir / "pids.json").exists()
    assert not (run_dir / "coordinator-traceback.txt").exists()
    assert (run_dir / "config.json").exists() and (run_dir / "checkpoints").is_dir()


def test_a_run_folder_entry_of_another_kind_is_refused_before_anything_is_written(tmp_path, capsys):
    """A file where a run keeps its checkpoints folder (what `--resume` then advised to start
    again with --out) failed a shard after the old run's records were written over; a folder
    where its summary.json or metrics.csv goes failed the job once it had trained."""
    import os

    from distbelief.launch.cli import main
    from distbelief.launch.rundir import misplaced_run_entry

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(JobConfig().to_json())
    (run_dir / "checkpoints").write_text("")
    before = (run_dir / "config.json").read_text()
    for command in (["--out", str(run_dir), "--steps", "5"], ["--resume", str(run_dir)]):
        assert main(["train", *command]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == (
            f"distbelief train: error: {command[0]} {run_dir}: {run_dir / 'checkpoints'} is a "
            "file, where the run keeps its folder of that name"
        )
    assert (run_dir / "config.json").read_text() == before
    (run_dir / "checkpoints").unlink()
    (run_dir / "metrics.csv").mkdir()
    assert main(["eval", "--ps", "tcp://127.0.0.1:1", "--out", str(run_dir)]) == 2  # no retries
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"distbelief eval: error: --out {run_dir}: {run_dir / 'metrics.csv'} is a folder, where "
        "the run keeps its file of that name"
    )
    (run_dir / "metrics.csv").rmdir()
    os.mkfifo(run_dir / "summary.json")
    assert "summary.json is a FIFO" in misplaced_run_entry(run_dir)
    (run_dir / "summary.json").unlink()
    (run_dir / "tensorboard").symlink_to(tmp_path / "gone")
    assert "tensorboard is a broken link" in misplaced_run_entry(run_dir)
    (run_dir / "tensorboard").unlink()
    assert misplaced_run_entry(run_dir) is None
