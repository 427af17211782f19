"""The coordinator's loop (``coordinator.run._optimize``) over in-process shards: a shard found
restarted by the last checkpoint's save, after the last iteration, is rolled back to the last
committed checkpoint and the iterations since are done again, as at any other moment (the
job failed with ShardRestartedError there)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from distbelief.config import JobConfig
from distbelief.coordinator import checkpoint
from distbelief.coordinator.portions import EvaluationFigures, EvaluationOutcome
from distbelief.coordinator.run import _optimize, commit_start_point, lbfgs_settings
from distbelief.errors import ShardRestartedError
from tests.unit.local_vectors import LocalShards, batch_evaluator

ITERATIONS = 4
RESTARTED = "shard 0 was restarted: its vectors are its last checkpoint's"


class _CheckpointedShards:
    """``LocalShards`` as the coordinator's ``ShardVectors``: a checkpoint is a snapshot by tag;
    the save of tag ``restart_at`` finds a shard restarted once (the shards hold their last
    checkpoint's vectors, and refuse programs until a restore)."""

    def __init__(self, shards: LocalShards, folder: Path, restart_at: str) -> None:
        self.shards = shards
        self.folder = folder
        self.restart_at: str | None = restart_at
        self.saved: dict[str, list] = {}
        self.last_saved: str | None = None
        self.shard_restarted = False

    def run(self, program, *, checkpoint: str | None = None, restore: str | None = None) -> list:
        if restore is not None:
            self.shards.restore(self.saved[restore])
            self.shard_restarted = False
        elif self.shard_restarted:
            raise ShardRestartedError(
                "shard 0 was restarted: its vectors are its last checkpoint's"
            )
        elif checkpoint is not None and checkpoint == self.restart_at:
            self.restart_at = None
            assert self.last_saved is not None
            self.shards.restore(self.saved[self.last_saved])
            self.shard_restarted = True
            raise ShardRestartedError(
                "shard 0 was restarted: its vectors are its last checkpoint's"
            )
        results = self.shards.run(program)
        if checkpoint is not None:
            (self.folder / checkpoint).mkdir(exist_ok=True)  # where the shards' files would be
            self.saved[checkpoint] = self.shards.snapshot()
            self.last_saved = checkpoint
        return results


class _Service:
    """The coordinator service's part the loop uses: whole-batch evaluations, no workers."""

    worker_hosts: dict = {}

    def __init__(self, evaluate) -> None:
        self._evaluate = evaluate

    def evaluate(self, evaluation: int, point: str, timeout_s: float) -> EvaluationOutcome:
        sums = self._evaluate(evaluation, point)
        figures = EvaluationFigures(
            portions_by_worker={},
            backups_issued=0,
            backups_won=0,
            duplicates=0,
            reassigned=0,
            time_s=0.0,
        )
        return EvaluationOutcome(
            evaluation=evaluation,
            loss_sum=sums.loss_sum,
            num_examples=sums.num_examples,
            figures=figures,
        )

    def finish(self, timeout_s: float, expected: list[str]) -> int:
        return 0


def test_a_shard_restarted_under_the_last_save_is_rolled_back_and_the_run_ends(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(8, 3).double()
    inputs, labels = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    config = JobConfig.from_fields(
        {
            "optimizer.algorithm": "sandblaster",
            "cluster.num_workers": 1,
            "sandblaster.max_iterations": ITERATIONS,
            "server.checkpoint_every_s": 3600.0,  # the last save comes after the last iteration
            "faults.max_restarts": 1,
        }
    )
    shards = LocalShards(model, 2)
    last_save = checkpoint.checkpoint_tag(ITERATIONS, started=True)
    vectors = _CheckpointedShards(shards, tmp_path, restart_at=last_save)
    settings = lbfgs_settings(config)
    commit_start_point(vectors, {}, settings, str(tmp_path), config.faults)
    events: list[tuple[str, dict]] = []
    result = _optimize(
        config,
        vectors,
        _Service(batch_evaluator(shards, model, inputs, labels)),
        lambda kind, payload: events.append((kind, payload)),
        threading.Event(),
        str(tmp_path),
        0.0,
        False,
    )
    assert result["iterations"] == ITERATIONS
    assert vectors.restart_at is None  # the restart happened, under the last save
    rolled_back = [payload for kind, payload in events if kind == "rolled_back"]
    assert rolled_back == [{"from_iteration": ITERATIONS, "to_iteration": 0}]
    assert checkpoint.read_record(tmp_path)["iteration"] == ITERATIONS
