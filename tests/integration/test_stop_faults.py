"""Processes that die while ``distbelief train`` stops after Ctrl-C: each death is in
``summary.json``'s faults, nothing is restarted, and a Sandblaster run's summary says which
iteration a resume goes on from (and the resume does); and a shard killed as a finished job
ends, whose restart the final evaluation follows; and Ctrl-C as a finished job ends, which
leaves it done.

The Ctrl-C tests SIGKILL their victim right after the launcher's SIGINT: the launcher is then
stopping the job (a Sandblaster coordinator ends the iteration under way first; the shards wait
for the workers to be gone), and the victim had not finished its own stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from distbelief.config import JobConfig
from distbelief.evaluator.run import watch_shards
from distbelief.launch import train
from distbelief.launch.cluster import ProcessKind
from distbelief.launch.local import LocalCluster
from distbelief.server import ParameterShard, ShardService
from distbelief.server.checkpoint import load_checkpoint
from distbelief.server.optimizers import server_optimizer_from_config
from distbelief.telemetry import read_metrics
from distbelief.wire import serve
from tests.conftest import CLI, run_forked, start_scripts, stop_processes

RUN_TIMEOUT_S = 240
DOWNPOUR = (
    "train",
    *("--dataset", "digits", "--model", "mlp", "--shards", "2", "--workers", "2"),
    *("--steps", "1000000", "--eval-every", "5", "--no-plots"),
)
SANDBLASTER = (
    "train",
    *("--algorithm", "sandblaster", "--dataset", "digits", "--model", "mlp"),
    *("--shards", "2", "--workers", "2", "--history", "5", "--eval-every", "5"),
    *("--max-iterations", "100000", "--no-plots"),
)


def _rows(run_dir: Path, role: str) -> list[dict]:
    if not (run_dir / "metrics.csv").exists():
        return []
    return [row for row in read_metrics(run_dir / "metrics.csv") if row["role"] == role]


def _interrupt_and_kill(
    run_dir: Path,
    args: tuple[str, ...],
    role: str,
    victim: str,
    before_interrupt: Callable[[], None] = lambda: None,
    victim_signal: signal.Signals = signal.SIGKILL,
) -> tuple[subprocess.CompletedProcess, int]:
    """Runs ``args``; once metrics.csv has 4 rows of ``role``, calls ``before_interrupt``,
    sends the launcher SIGINT and at once ``victim_signal`` (SIGKILL) to process ``victim``
    (by its pid in pids.json). Returns how the launcher ended and the victim's pid."""
    [launcher] = start_scripts([[*CLI[1:], *args, "--out", str(run_dir)]])
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(_rows(run_dir, role)) < 4:
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"no 4 {role} rows recorded"
            time.sleep(0.1)
        pid = json.loads((run_dir / "pids.json").read_text())[victim]
        before_interrupt()
        launcher.send_signal(signal.SIGINT)
        os.kill(pid, victim_signal)
        out, err = launcher.communicate(timeout=120)
    finally:
        stop_processes([launcher])
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err), pid


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_shard_killed_or_failing_while_the_job_stops_is_in_the_summary_and_not_restarted(
    tmp_path,
):
    """shard1 is killed; shard0 cannot save its last checkpoint (a folder is where its record
    goes) and reports the error: each is a fault of the stop, the interrupted job stays so."""
    run_dir = tmp_path / "run"

    def block_shard0s_last_save() -> None:
        record = run_dir / "checkpoints" / "shard0.json"
        record.unlink()
        record.mkdir()

    result, pid = _interrupt_and_kill(
        run_dir, DOWNPOUR, "worker", "shard1", before_interrupt=block_shard0s_last_save
    )
    assert result.returncode == 130, result.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["outcome"] == "interrupted"
    faults = {
        f["process"]: (
            f["exitcode"],
            f["action"],
            f["while_stopping"],
            f["last_checkpoint_saved"],
            f.get("error"),
        )
        for f in summary["faults"]
    }
    assert faults.keys() == {"shard0", "shard1"}
    assert faults["shard1"] == (-signal.SIGKILL, "given up", True, False, None)
    assert faults["shard0"][:4] == (1, "given up", True, False)
    assert faults["shard0"][4].startswith("IsADirectoryError"), faults["shard0"]
    assert "shard1 died (exit code -9) while the job stopped; given up" in result.stderr
    said = "shard0 failed (exit code 1) while the job stopped: IsADirectoryError"
    assert said in result.stderr, result.stderr[-3000:]
    assert json.loads((run_dir / "pids.json").read_text())["shard1"] == pid  # no second life


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_shards_that_cannot_save_as_a_finished_job_stops_are_each_a_fault(tmp_path):
    """Both shards of a job whose worker finished fail their last save: the job fails, and
    each shard is a fault of the stop. The first to fail was left out of the faults (only the
    summary's reason named it), the second was one."""
    run_dir = tmp_path / "run"
    job = ("train", *("--model", "mlp", "--shards", "2", "--workers", "1", "--steps", "1500"))
    job += ("--checkpoint-every", "3600", "--no-eval", "--no-plots")
    [launcher] = start_scripts([[*CLI[1:], *job, "--out", str(run_dir)]])
    records = [run_dir / "checkpoints" / f"shard{i}.json" for i in range(2)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not all(record.exists() for record in records):  # the first checkpoints
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no first checkpoints"
            time.sleep(0.02)
        for record in records:  # a folder where each one's last record goes
            record.unlink()
            record.mkdir()
        _, err = launcher.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop_processes([launcher])
    assert launcher.returncode == 1, err[-3000:]
    summary = _summary(run_dir)
    assert summary["outcome"] == "failed"
    assert summary["worker_steps"] == {"0": 1500}  # the worker had finished
    faults = {fault["process"]: fault for fault in summary["faults"]}
    assert faults.keys() == {"shard0", "shard1"}, summary["faults"]
    for name, fault in faults.items():
        assert (fault["action"], fault["while_stopping"]) == ("given up", True), fault
        assert fault["error"].startswith("IsADirectoryError"), fault
        said = f"{name} failed (exit code 1) while the job stopped: IsADirectoryError"
        assert said in err, err[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ["downpour", "sandblaster"])
def test_a_shard_the_launcher_kills_before_it_saved_its_last_checkpoint_is_a_fault(
    tmp_path, algorithm
):
    """shard1, stopped (SIGSTOP), cannot save its last checkpoint as the job stops: the
    launcher kills it once the stop's grace period is over. That kill, the launcher's own, was
    no fault, and nothing said that a resume would restore an older checkpoint of it. A
    Sandblaster shard, which saves nothing on the way out, was no fault either (nor said)."""
    run_dir = tmp_path / "run"
    args, role = (DOWNPOUR, "worker")
    if algorithm == "sandblaster":  # its coordinator's iteration waits on the hung shard
        args, role = ((*SANDBLASTER, "--timeout", "10"), "coordinator")
    result, _ = _interrupt_and_kill(run_dir, args, role, "shard1", victim_signal=signal.SIGSTOP)
    assert result.returncode == 130, result.stderr[-3000:]
    summary = _summary(run_dir)
    [fault] = summary["faults"]
    cause = (
        "killed by the launcher 5s after it was asked to stop, before it saved its last checkpoint"
        if algorithm == "downpour"
        else "killed by the launcher 5s after it was asked to stop, before it exited (hung, or "
        "stopped)"
    )
    assert (fault["process"], fault["exitcode"], fault["cause"]) == ("shard1", -9, cause)
    assert (fault["action"], fault["while_stopping"]) == ("given up", True)
    if algorithm == "downpour":
        assert fault["last_checkpoint_saved"] is False
    else:  # whether the coordinator committed the iteration the job reached
        assert isinstance(fault["last_checkpoint_saved"], bool)
    # The stop is within the launch's time: elapsed_s was measured before it.
    assert fault["time_s"] <= summary["elapsed_s"]
    said = f"shard1 died (exit code -9: {cause}) while the job stopped; given up"
    assert said in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_coordinator_killed_while_the_job_stops_is_not_restarted_and_a_resume_goes_on(
    tmp_path,
):
    run_dir = tmp_path / "run"
    result, pid = _interrupt_and_kill(run_dir, SANDBLASTER, "coordinator", "coordinator")
    assert result.returncode == 130, result.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["outcome"] == "interrupted"
    faults = [(f["process"], f["exitcode"], f["action"]) for f in summary["faults"]]
    assert faults == [("coordinator", -signal.SIGKILL, "given up")]
    assert json.loads((run_dir / "pids.json").read_text())["coordinator"] == pid
    assert "went back" not in result.stdout  # nothing rolled back
    record = json.loads((run_dir / "checkpoints" / "coordinator.json").read_text())
    coordinator = summary["coordinator"]
    assert coordinator["resumes_from_iteration"] == record["iteration"]
    assert coordinator["iterations"] >= record["iteration"]
    said = f"--resume goes on from iteration {record['iteration']}" in result.stderr
    assert said == (coordinator["iterations"] > record["iteration"]), result.stderr[-3000:]

    resumed_to = record["iteration"] + 2
    resumed = run_forked("train", "--resume", str(run_dir), "--max-iterations", str(resumed_to))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [row["step"] for row in _rows(run_dir, "coordinator")]
    # The resume's rows follow the earlier ones: from the committed iteration on.
    assert steps[-2:] == [record["iteration"] + 1, resumed_to]
    assert _summary(run_dir)["coordinator"]["resumes_from_iteration"] == resumed_to


class ShardKilledAfterTheFinalEvaluation(LocalCluster):
    """The local cluster, but shard1 is SIGKILLed once the evaluator has returned its final
    evaluation, before the launcher asks the shards to stop: the launcher sees it die, and
    restarts it from its last checkpoint, while the job ends."""

    killed = False

    def finished(self, kind: ProcessKind) -> bool:
        done = super().finished(kind)
        if kind is ProcessKind.EVALUATOR and done and not self.killed:
            self.killed = True
            _, process = self.processes["shard1"]
            os.kill(process.pid, signal.SIGKILL)
            process.join(30)
            return False  # the launcher takes in the death before it stops the shards
        return done


def _final_evaluation_only(tmp_path: Path, *, steps: int) -> JobConfig:
    """An MLP on digits, 2 workers and 2 shards running ``steps`` each, evaluated at the end."""
    return JobConfig.from_fields(
        {
            "cluster.num_workers": 2,
            "cluster.num_shards": 2,
            "model.name": "mlp",
            "data.name": "digits",
            "optimizer.steps": steps,
            "reporting.eval_during_training": False,
            "reporting.out_dir": str(tmp_path / "run"),
        }
    )


def _evaluate_checkpoints(config: JobConfig, run_dir: Path) -> dict:
    """What ``eval --once`` reports of shards restored from the run's last checkpoints."""
    servers = []
    try:
        for shard_id in range(config.cluster.num_shards):
            shard = ParameterShard(
                shard_id, config.cluster.num_shards, server_optimizer_from_config(config.server)
            )
            state = load_checkpoint(run_dir / "checkpoints", shard_id)
            assert state is not None
            shard.restore(state)
            servers.append(serve("tcp://127.0.0.1:0", ShardService(shard)))
        return watch_shards(config, [server.address for server in servers], once=True)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_shard_restarted_after_the_final_evaluation_is_evaluated_again(tmp_path):
    """Killed after the workers finished, shard1 comes back from its first checkpoint (the
    periodic ones are 30 s apart): summary.json's final is the evaluation of what the run
    ends with, not the one before the restart."""
    config = _final_evaluation_only(tmp_path, steps=60)
    result = train(config, cluster_type=ShardKilledAfterTheFinalEvaluation)
    summary = _summary(result.run_dir)
    assert summary["outcome"] == "done"
    [fault] = summary["faults"]
    assert (fault["process"], fault["action"], fault["while_stopping"]) == (
        "shard1",
        "restarted",
        False,
    )
    assert fault["lost_updates"] > 0
    ended_with = _evaluate_checkpoints(config, result.run_dir)
    assert summary["final"]["test_loss"] == pytest.approx(ended_with["test_loss"], rel=1e-5)
    assert summary["final"]["test_accuracy"] == ended_with["test_accuracy"]
    # Two evaluations in metrics.csv: the one the restart made stale, then summary.json's.
    evaluations = _rows(result.run_dir, "evaluator")
    assert len(evaluations) == 2
    assert evaluations[-1]["test_loss"] == pytest.approx(summary["final"]["test_loss"])


class CtrlCAsTheFinishedJobStops(LocalCluster):
    """The local cluster, but Ctrl-C reaches the launcher as it stops the processes of a job
    whose training and final evaluation are over, as a user's impatient Ctrl-C would."""

    def stop_all(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        super().stop_all()


@pytest.mark.timeout(120)
def test_ctrl_c_after_the_final_evaluation_leaves_the_run_done(tmp_path, caplog):
    """The job's training and final evaluation are complete: the run stays done (train
    returns, exit 0), and only its plots are skipped, with the command that draws them."""
    config = _final_evaluation_only(tmp_path, steps=5)
    result = train(config, cluster_type=CtrlCAsTheFinishedJobStops)
    summary = _summary(result.run_dir)
    assert (summary["outcome"], summary["reason"]) == ("done", None)
    assert summary["final"]["test_accuracy"] is not None
    assert (result.run_dir / "staleness.json").exists()
    assert not list(result.run_dir.glob("*.png"))
    assert f"draw them later with: distbelief plot {result.run_dir}" in caplog.text


@pytest.mark.timeout(120)
def test_ctrl_c_while_a_done_jobs_summary_is_written_leaves_it_done(tmp_path, caplog, monkeypatch):
    """It exited 130 (train raised), with summary.json saying "done" or not written yet: now
    the records are written whole and the job stays done; only its plots are skipped."""
    from distbelief.launch import summary as summary_module

    written = summary_module.write_text_atomic
    stops: list[Path] = []

    def with_ctrl_c(path: Path, text: str) -> None:
        stops.append(path)
        signal.raise_signal(signal.SIGINT)  # as a Ctrl-C at that instant
        written(path, text)

    monkeypatch.setattr(summary_module, "write_text_atomic", with_ctrl_c)
    result = train(_final_evaluation_only(tmp_path, steps=5))
    assert [path.name for path in stops] == ["summary.json"]
    summary = _summary(result.run_dir)
    assert (summary["outcome"], summary["reason"]) == ("done", None)
    assert (result.run_dir / "staleness.json").exists()
    assert not list(result.run_dir.glob("*.png"))
    assert "not drawn (stopped as the job ended); draw them later with" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
