"""Model parallelism as users run it: the 2 or 3 stage processes of one replica (the manual
roles) against real shards train exactly as torch.optim.SGD on the whole model; a stage given
another split (or rank) than its neighbour is refused naming the flag; the launcher runs
replicas x stages and restarts a replica whose stage was killed, while the other goes on."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from distbelief.config import JobConfig
from distbelief.data import load_job_dataset, worker_indices
from distbelief.errors import ConfigFieldError
from distbelief.evaluator.ps import PSEvaluator
from distbelief.launch.cli import main
from distbelief.pipeline.job import job_split, stage_plan
from distbelief.pipeline.wire_links import WireLinks
from distbelief.telemetry import read_metrics
from distbelief.worker import build_replica, worker_batches
from tests.conftest import CHILD_ENV, CLI, run_forked, stop_processes

_LISTENING = re.compile(r"stage (\d+) listening at (tcp://\S+)")
STEPS = 6
JOB = {
    "model.name": "mlp",
    "data.name": "digits",
    "optimizer.lr": 0.1,
    "optimizer.batch_size": 16,
    "optimizer.steps": STEPS,
    "optimizer.blocking": True,
    "pipeline.num_partitions": 2,
    "pipeline.split_points": (3,),
    "pipeline.num_micro_batches": 4,
}


def _stage(
    stage: int, addresses: list[str], num_stages: int, points: str, *extra: str
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *CLI,
            "worker",
            "--ps",
            ",".join(addresses),
            "--rank",
            "0",
            "--num-workers",
            "1",
            "--model",
            "mlp",
            "--dataset",
            "digits",
            "--lr",
            "0.1",
            "--batch-size",
            "16",
            "--steps",
            str(STEPS),
            "--blocking",
            "--partitions",
            str(num_stages),
            "--split-points",
            points,
            "--micro-batches",
            "4",
            "--stage",
            str(stage),
            # A stage's first activation waits for the stages before it to start (torch, the
            # data): on a loaded machine that took more than the default 30 s.
            "--timeout",
            "120",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )


def _listening_address(process: subprocess.Popen, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if match := _LISTENING.search(line):
            return match.group(2)
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"stage did not listen: {process.stderr.read()[-2000:]}")


def _sgd_on_the_whole_model(config: JobConfig) -> nn.Module:
    train_set = load_job_dataset(config.data, "train")
    model = build_replica(config, train_set.input_shape, train_set.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optimizer.lr)
    indices = worker_indices(len(train_set), 0, 1, seed=config.model.seed)
    for images, labels in worker_batches(config, train_set, indices):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model


@pytest.mark.slow
@pytest.mark.parametrize(("num_stages", "points"), [(2, "3"), (3, "2,4")])
def test_the_stages_of_one_replica_train_as_sgd_on_the_whole_model(
    shard_cluster, num_stages, points
):
    addresses = shard_cluster(2, "--server-lr", "0.1")
    stages: list[subprocess.Popen] = []
    try:
        # Last to first, as a launcher does: each stage is told where the next one listens.
        next_address = None
        for stage in reversed(range(num_stages)):
            extra = ["--next", next_address] if next_address else []
            if stage > 0:
                extra += ["--bind", "tcp://127.0.0.1:0"]
            stages.insert(0, _stage(stage, addresses, num_stages, points, *extra))
            next_address = _listening_address(stages[0]) if stage > 0 else None
        errors = [process.communicate(timeout=120)[1] for process in stages]
        # Every stage's output on a failure: the first to fail may be any of them.
        failed = {i: err[-1500:] for i, err in enumerate(errors) if stages[i].returncode != 0}
        assert not failed, failed
    finally:
        stop_processes(stages)
    split = tuple(int(point) for point in points.split(","))
    config = JobConfig.from_fields(
        {
            **JOB,
            "pipeline.num_partitions": num_stages,
            "pipeline.split_points": split,
            "cluster.num_shards": 2,
            "cluster.num_workers": 1,
        }
    )
    evaluator = PSEvaluator(config, addresses)
    try:
        result = evaluator.evaluate()  # pulls every partition's group into the whole model
        pulled = dict(evaluator.model.named_parameters())
    finally:
        evaluator.close()
    # Each partition's stage pushed every step to its own group: one version each, not a sum.
    assert (result["version"], result["partition_versions"]) == (STEPS, [STEPS] * num_stages)
    reference = _sgd_on_the_whole_model(config)
    for name, want in reference.named_parameters():
        torch.testing.assert_close(pulled[name], want, atol=1e-6, rtol=0, msg=name)


def _stage_plan(fields: dict, rank: int) -> dict[str, object]:
    """The plan a stage of ``fields``'s job holds for replica ``rank``."""
    config = JobConfig.from_fields(fields)
    train_set = load_job_dataset(config.data, "train")
    return stage_plan(config, rank, job_split(config, train_set.input_shape, train_set.num_classes))


@pytest.mark.parametrize(
    ("stage0_flags", "message"),
    [
        (
            ["--split-points", "2"],
            r"argument --split-points: is 2 for stage 0 but 3 for stage 1 "
            r"\(tcp://127\.0\.0\.1:\d+\): give every stage of the replica the same",
        ),
        (
            ["--split-points", "3", "--rank", "1"],
            r"argument --rank: is 1 for stage 0 but 0 for stage 1 \(tcp://127\.0\.0\.1:\d+\)",
        ),
    ],
    ids=["split-points", "rank"],
)
def test_a_stage_given_another_plan_than_the_next_exits_2_naming_the_flag(
    stage0_flags, message, capsys
):
    # Stage 1 of replica 0 of 2, listening as its process does, split at 3.
    fields = {**JOB, "cluster.num_workers": 2}
    with WireLinks(
        1,
        2,
        bind="tcp://127.0.0.1:0",
        next_address=None,
        security=None,
        timeout_s=30.0,
        plan=_stage_plan(fields, 0),
    ) as stage1:
        argv = [
            *("worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "2"),
            *("--model", "mlp", "--dataset", "digits", "--lr", "0.1", "--batch-size", "16"),
            *("--steps", str(STEPS), "--blocking", "--partitions", "2", "--micro-batches", "4"),
            *("--stage", "0", "--next", str(stage1.address), *stage0_flags),
        ]
        assert main(argv) == 2
        with pytest.raises(ConfigFieldError):  # refused on stage 1's side as well
            stage1.recv_forward(1, 0, 30.0)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), errors


def _replica_steps(run_dir: Path) -> dict[int, int]:
    path = run_dir / "metrics.csv"
    steps: dict[int, int] = {}
    if path.exists():
        for row in read_metrics(path):
            if row["role"] == "worker":
                steps[row["rank"]] = max(steps.get(row["rank"], 0), row["step"])
    return steps


def _pids(run_dir: Path) -> dict[str, int]:
    path = run_dir / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_partitioned_runs_final_version_is_given_per_partition(tmp_path):
    # Each partition's stages push to a group of its own: a sum of the groups' versions would
    # say 2 x the steps; every partition had one update per step.
    run_dir = tmp_path / "run"
    result = run_forked(
        *("train", "--model", "mlp", "--partitions", "2", "--split-points", "3"),
        *("--workers", "1", "--shards", "2", "--micro-batches", "2", "--steps", str(STEPS)),
        *("--no-eval", "--no-plots", "--out", str(run_dir)),
        timeout_s=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert (final["version"], final["partition_versions"]) == (STEPS, [STEPS, STEPS])
    assert f"(parameter server, partition versions {STEPS}, {STEPS}); run folder" in result.stdout
    [row] = [row for row in read_metrics(run_dir / "metrics.csv") if row["role"] == "evaluator"]
    assert row["version"] == STEPS


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_stage_restarts_its_replica_and_the_other_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            *CLI,
            "train",
            "--model",
            "mlp",
            "--workers",
            "2",
            "--shards",
            "1",
            "--partitions",
            "2",
            "--micro-batches",
            "2",
            "--steps",
            "400",
            "--checkpoint-every",
            "1",
            "--out",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        deadline = time.monotonic() + 180
        while _replica_steps(run_dir).get(1, 0) < 20:
            assert launcher.poll() is None, launcher.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "replica 1 never reached step 20"
            time.sleep(0.2)
        before = _pids(run_dir)
        os.kill(before["worker1.stage1"], signal.SIGKILL)
        _, err = launcher.communicate(timeout=240)
    finally:
        stop_processes([launcher])
    assert launcher.returncode == 0, err[-3000:]
    after = _pids(run_dir)
    # The other replica's stages were never restarted; both of replica 1's were.
    assert after["worker0.stage0"] == before["worker0.stage0"], err[-3000:]
    assert after["worker0.stage1"] == before["worker0.stage1"], err[-3000:]
    assert after["worker1.stage0"] != before["worker1.stage0"]
    summary = json.loads((run_dir / "summary.json").read_text())
    faults = [(f["process"], f["action"]) for f in summary["faults"]]
    assert ("worker1.stage1", "restarted") in faults
    assert all(process.startswith("worker1") for process, _ in faults)
    assert summary["worker_steps"] == {"0": 400, "1": 400}
    assert summary["partitions"]["split_points"]
    assert summary["final"]["test_accuracy"] > 0.5
    # The replica went on after its last push every stage got applied, not at its last report
    # (up to 9 steps before, each pushed again), and a stage pushed none of the steps its
    # shards took from its dead life (one a push ahead, or in flight): each partition took
    # each replica's 400 pushes once.
    [fault] = [f for f in summary["faults"] if f["process"] == "worker1.stage1"]
    assert 0 < fault["resumed_at_step"] < 400
    assert summary["final"]["partition_versions"] == [800, 800]


def test_each_stages_last_record_counts_its_last_push(tmp_path):
    """Blocking top-k pushes and close's full-width push of the residual: each stage's last
    record of ``train --partitions 2`` counts that push as well (metrics.csv's bytes_pushed).
    Records at steps 10, 20 and 22: the first has the INIT (the stage's parameters at full
    width, F) and ten top-k pushes (10 K); the second 10 K; the last 2 K and F."""
    out = tmp_path / "run"
    job = ["--model", "mlp", "--dataset", "digits", "--partitions", "2", "--workers", "1"]
    result = run_forked(
        "train",
        *job,
        *("--shards", "1", "--steps", "22", "--blocking", "--push-compression", "topk:0.1"),
        *("--transport", "tcp", "--no-eval", "--no-plots", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [r for r in read_metrics(out / "metrics.csv") if r["role"] == "worker"]
    for stage in (0, 1):
        pushed = [(r["step"], r["bytes_pushed"]) for r in records if r["stage"] == stage]
        assert [step for step, _ in pushed] == [10, 20, 22]
        (_, first), (_, second), (_, last) = pushed
        full_width, top_k = first - second, second // 10
        assert second == 10 * top_k and 0 < top_k < full_width
        assert last == 2 * top_k + full_width, stage
