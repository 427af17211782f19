"""``distbelief train --algorithm sandblaster`` for real: a small run's records, checkpoints and
plots; ``--resume`` with more iterations; a coordinator, a worker or a shard SIGKILLed mid-run,
and a shard before the first iteration.

The restart tests cut each evaluation into two portions pushed one per bundle: the shards then
add two gradients, and float addition commutes, so the batch gradient is the same to the last
bit whichever bundle arrives first. An undisturbed run, a resumed one and one whose coordinator
or worker was killed then follow one sequence: their final losses agree to 1e-9. (With more
portions the float32 sum depends on the order the bundles arrive in, and L-BFGS's line search
can amplify that difference in the last digit to the third after a dozen iterations.)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distbelief.telemetry import read_metrics
from tests.conftest import CHILD_ENV, CLI, run_forked, run_main

SANDBLASTER = (
    "train",
    *("--algorithm", "sandblaster", "--dataset", "digits", "--model", "mlp"),
    *("--shards", "2", "--workers", "2", "--history", "5", "--eval-every", "5"),
)
ITERATIONS = 10
RUN_TIMEOUT_S = 240


def _same_sequence(iterations: int = ITERATIONS) -> tuple[str, ...]:
    """Flags under which every run follows the same sequence (see the module docstring)."""
    return (
        *SANDBLASTER,
        *("--portions", "2", "--portions-per-push", "1", "--max-iterations", str(iterations)),
        # Any time at all since the last checkpoint is enough: one at every iteration's end.
        *("--checkpoint-every", "0.001"),
    )


def _records(run_dir: Path, role: str) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.csv") if row["role"] == role]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _train(*args: str) -> subprocess.CompletedProcess:
    result = run_forked(*args, timeout_s=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# Session scope: other modules' tests in between would end a module-scoped fixture and make the
# run again (its tests share one test process: xdist_group "undisturbed").
@pytest.fixture(scope="session")
def undisturbed_run(tmp_path_factory) -> Path:
    """The folder of a run with ``_same_sequence()``'s flags that nothing disturbed (read only:
    every test of the group shares it)."""
    run_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    _train(*_same_sequence(), "--out", str(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def undisturbed(undisturbed_run) -> dict:
    """The summary of the undisturbed run."""
    summary = _summary(undisturbed_run)
    assert summary["coordinator"]["iterations"] == ITERATIONS
    assert summary["faults"] == []
    return summary


@pytest.mark.slow
@pytest.mark.timeout(400)  # with the undisturbed run when this test is the first to need it
@pytest.mark.xdist_group("undisturbed")
def test_a_run_records_every_iteration_checkpoints_and_plots(undisturbed_run):
    run_dir = undisturbed_run
    iterations, portions = ITERATIONS, 2
    rows = _records(run_dir, "coordinator")
    assert [row["step"] for row in rows] == list(range(iterations + 1))
    losses = [row["loss"] for row in rows]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    for row in rows:
        assert row["grad_norm"] > 0
        assert row["evaluations"] >= 1
        assert row["portions"] == row["evaluations"] * portions
        assert row["backups"] is not None and row["backups_won"] is not None
        assert (row["step_size"] > 0) == (row["step"] > 0)
    for row in rows:
        workers = [r for r in _records(run_dir, "worker") if r["step"] == row["step"]]
        assert sorted(r["rank"] for r in workers) == [0, 1]
        assert sum(r["portions"] for r in workers) == row["portions"]

    summary = _summary(run_dir)
    assert summary["coordinator"]["iterations"] == iterations
    assert summary["coordinator"]["stop_reason"] == "max_iterations"
    assert summary["coordinator"]["loss"] == pytest.approx(losses[-1])
    assert summary["faults"] == []
    assert summary["final"]["test_accuracy"] > 0.3  # chance: 0.1
    checkpoints = run_dir / "checkpoints"
    record = json.loads((checkpoints / "coordinator.json").read_text())
    assert record["iteration"] == iterations
    assert [path.name for path in checkpoints.glob("lbfgs-*")] == [record["tag"]]
    for plot in ("loss_vs_time.png", "accuracy_vs_time.png", "throughput_vs_time.png"):
        assert (run_dir / plot).stat().st_size > 0, plot


def _kill_mid_run(
    run_dir: Path, victim: str, *flags: str
) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``_same_sequence()`` (and ``flags``), SIGKILL ``victim`` once the coordinator has
    committed iteration 2, and let the run finish; returns how it ended, and the seconds from
    the kill to the launcher's exit.

    The trigger is the coordinator's own checkpoint record, not metrics.csv: the launcher writes
    the metrics, and on a busy machine they can lag the coordinator by seconds, long enough for
    the last 8 iterations to end before the kill."""
    launcher = subprocess.Popen(
        [*CLI, *_same_sequence(), *flags, "--no-plots", "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not _committed(run_dir, iteration=2):
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the coordinator committed no iteration 2"
            time.sleep(0.05)
        os.kill(json.loads((run_dir / "pids.json").read_text())[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = launcher.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate(timeout=30)
    ended = subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)
    return ended, time.monotonic() - killed_at


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("victim", "cause"),
    [
        ("worker0", "no worker is left to compute its portions"),
        ("shard1", "shard1 was given up"),
    ],
)
def test_a_process_given_up_fails_the_job_without_waiting_out_the_timeout(tmp_path, victim, cause):
    """The iteration under way cannot end without a worker, or with a shard gone: the launcher
    waited for the coordinator to commit it up to the request timeout (here 150 s), in
    silence, before the job failed."""
    flags = ("--workers", "1", "--max-restarts", "0", "--timeout", "150")
    result, exited_after_s = _kill_mid_run(tmp_path / "run", victim, *flags)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"the coordinator's iteration under way cannot end: {cause}" in result.stderr
    assert exited_after_s < 100, result.stderr[-3000:]
    assert _summary(tmp_path / "run")["outcome"] == "failed"


def _committed(run_dir: Path, iteration: int) -> bool:
    try:
        record = json.loads((run_dir / "checkpoints" / "coordinator.json").read_text())
    except (OSError, ValueError):  # not written yet (it is replaced whole, never half-written)
        return False
    return record["iteration"] >= iteration


@pytest.mark.slow
@pytest.mark.timeout(400)  # with the undisturbed run when this test is the first to need it
@pytest.mark.xdist_group("undisturbed")  # one test process: the undisturbed run is made once
@pytest.mark.parametrize("victim", ["coordinator", "worker1", "shard0"])
def test_a_process_killed_mid_run_changes_nothing(tmp_path, undisturbed, victim):
    run_dir = tmp_path / "run"
    result, _ = _kill_mid_run(run_dir, victim)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(run_dir)
    faults = [(f["process"], f["exitcode"], f["action"]) for f in summary["faults"]]
    assert faults == [(victim, -signal.SIGKILL, "restarted")]
    assert f"{victim} died (exit code -9); restarted" in result.stderr
    assert summary["coordinator"]["iterations"] == ITERATIONS
    assert summary["coordinator"]["loss"] == pytest.approx(
        undisturbed["coordinator"]["loss"], rel=1e-9
    )
    # A restarted coordinator repeats the iterations after its last checkpoint: every
    # iteration is reported, some twice, each time alike.
    rows = _records(run_dir, "coordinator")
    assert {row["step"] for row in rows} == set(range(ITERATIONS + 1))
    for step in range(ITERATIONS + 1):
        assert len({row["loss"] for row in rows if row["step"] == step}) == 1, step
    # What the job redid is what it reported twice, and the launcher says so.
    fault, redone = summary["faults"][0], len(rows) - (ITERATIONS + 1)
    if victim == "worker1":
        assert (fault["rolled_back"], fault["updates_redone"], redone) == (False, None, 0)
    else:
        assert (fault["rolled_back"], fault["updates_redone"], fault["lost_updates"]) == (
            True,
            redone,
            0,
        )
        said = f"redid {redone} update{'' if redone == 1 else 's'}" if redone else "nothing to redo"
        assert said in result.stdout


def _pids(run_dir: Path) -> dict[str, int]:
    try:
        return json.loads((run_dir / "pids.json").read_text())
    except (OSError, ValueError):  # not written yet (it is replaced whole)
        return {}


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.xdist_group("undisturbed")
def test_a_shard_killed_before_the_first_iteration_changes_nothing(tmp_path, undisturbed):
    """The coordinator commits the start point (the shards' first checkpoint) before the first
    evaluation: a shard killed then (the workers held with SIGSTOP, so that no iteration ends)
    comes back with the model's values, and the job goes on as if undisturbed. (The shards saved
    only at the first iteration's end: a shard restarted before it had no parameters and the
    job failed, "shard 1 holds no parameters".)"""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [*CLI, *_same_sequence(), "--timeout", "120", "--no-plots", "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    names = ["worker0", "worker1"]
    stopped: list[int] = []

    def wait_for(condition, what: str) -> None:
        while not condition():
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        wait_for(lambda: {*names, "shard1"} <= set(_pids(run_dir)), f"no {names} started")
        pids = _pids(run_dir)
        for name in names:
            os.kill(pids[name], signal.SIGSTOP)
            stopped.append(pids[name])
        wait_for(lambda: _committed(run_dir, 0), "the coordinator committed no start point")
        os.kill(pids["shard1"], signal.SIGKILL)
        wait_for(lambda: _pids(run_dir)["shard1"] != pids["shard1"], "shard1 was not restarted")
        # No iteration has ended: the kill came before the first.
        assert not (run_dir / "metrics.csv").exists() or not _records(run_dir, "coordinator")
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []
        out, err = launcher.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):  # the launcher ended it
                os.kill(pid, signal.SIGCONT)
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate(timeout=30)
    assert launcher.returncode == 0, err[-3000:]
    summary = _summary(run_dir)
    faults = [(f["process"], f["exitcode"], f["action"]) for f in summary["faults"]]
    assert faults == [("shard1", -signal.SIGKILL, "restarted")]
    fault = summary["faults"][0]
    assert (fault["updates_redone"], fault["lost_updates"]) == (0, 0)
    assert "nothing to redo" in out
    assert summary["coordinator"]["iterations"] == ITERATIONS
    assert summary["coordinator"]["loss"] == pytest.approx(
        undisturbed["coordinator"]["loss"], rel=1e-9
    )
    assert [row["step"] for row in _records(run_dir, "coordinator")] == list(range(ITERATIONS + 1))


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.xdist_group("undisturbed")
def test_resume_with_more_iterations_continues_from_the_committed_one(tmp_path, undisturbed):
    run_dir = tmp_path / "run"
    first = 4
    _train(*_same_sequence(first), "--no-plots", "--out", str(run_dir))
    assert json.loads((run_dir / "checkpoints" / "coordinator.json").read_text())["iteration"] == (
        first
    )
    _train("train", "--resume", str(run_dir), "--max-iterations", str(ITERATIONS))

    steps = [row["step"] for row in _records(run_dir, "coordinator")]
    assert steps == list(range(ITERATIONS + 1))  # 0-4, then 5-10: not from 0 again
    summary = _summary(run_dir)
    assert summary["coordinator"]["iterations"] == ITERATIONS
    assert summary["coordinator"]["loss"] == pytest.approx(
        undisturbed["coordinator"]["loss"], rel=1e-9
    )
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sandblaster"]["max_iterations"] == ITERATIONS


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_evaluation_budget_stops_a_run_and_a_resume_with_a_larger_one_goes_on(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(
        *SANDBLASTER,
        *("--portions", "2", "--max-iterations", "50", "--max-evaluations", "3"),
        *("--no-plots", "--out", str(run_dir)),
    )
    first = _summary(run_dir)["coordinator"]
    assert first["stop_reason"] == "max_evaluations reached"
    assert first["evaluations"] >= 3 and first["iterations"] < 3

    _train("train", "--resume", str(run_dir), "--max-evaluations", "6")
    resumed = _summary(run_dir)["coordinator"]
    assert resumed["stop_reason"] == "max_evaluations reached"
    assert resumed["evaluations"] >= 6 and resumed["iterations"] > first["iterations"]
    steps = [row["step"] for row in _records(run_dir, "coordinator")]
    assert steps == list(range(resumed["iterations"] + 1))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sandblaster"]["max_evaluations"] == 6
    # A bound the run has reached already would end it at once, having done nothing: refused,
    # the folder unchanged.
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    for flag, value, done in (
        ("--max-iterations", resumed["iterations"], f"{resumed['iterations']} iterations"),
        ("--max-evaluations", 2, f"{resumed['evaluations']} objective evaluations"),
    ):
        refused = run_main("train", "--resume", str(run_dir), flag, str(value), capsys=capsys)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.splitlines()[-1] == (
            f"distbelief train: error: argument {flag}: {run_dir} has done {done} already (its "
            f"last committed checkpoint): give more than {done.split()[0]} to go on"
        )
    # Only the other bound raised: the run's own evaluation budget, reached, stops it at once
    # (refused before a reshard too: the folder is left as it was).
    evaluations = resumed["evaluations"]
    for shards in ([], ["--shards", "1"]):
        argv = ["train", "--resume", str(run_dir), "--max-iterations", "1000", *shards]
        refused = run_main(*argv, capsys=capsys)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.splitlines()[-1] == (
            f"distbelief train: error: sandblaster.max_evaluations (in {run_dir / 'config.json'}"
            f"): {run_dir} has done {evaluations} objective evaluations already (its last "
            f"committed checkpoint): its max_evaluations is 6: give --max-evaluations more than "
            f"{evaluations} to go on"
        )
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_that_stopped_for_good_is_not_resumed(tmp_path, capsys):
    """A run that diverged (or met a tolerance: the same stop for good, which takes a hundred
    iterations to reach) stopped for good: resumed, with a bound raised or not, the job started,
    did nothing and wrote its records again."""
    run_dir = tmp_path / "run"
    argv = ["train", "--algorithm", "sandblaster", "--dataset", "synthetic", "--model", "mlp"]
    argv += ["--step-size", "1e15", "--max-iterations", "200", "--no-eval", "--no-plots"]
    _train(*argv, "--out", str(run_dir))
    coordinator = _summary(run_dir)["coordinator"]
    assert coordinator["stop_reason"] == "loss or gradient not finite", coordinator
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    for more in ([], ["--max-iterations", "400"]):
        refused = run_main("train", "--resume", str(run_dir), *more, capsys=capsys)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.splitlines()[-1] == (
            f"distbelief train: error: --resume {run_dir}: it stopped for good (loss or "
            "gradient not finite): raising a bound does not take it further"
        )
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_commits_the_iteration_under_way_so_a_resume_goes_on_from_there(tmp_path):
    """With the default --checkpoint-every (30 s) the only periodic checkpoint of a short run is
    iteration 0's: Ctrl-C stopped the workers first, the coordinator saved nothing, and a resume
    began again at iteration 1. The coordinator is asked to stop first now, and what it
    reports then is read before the run is recorded: its last iteration has its row in
    metrics.csv and is summary.json's (they were the iteration before). So with Ctrl-C pressed
    twice: the second, as the coordinator commits, cut the wait for its row and result (the
    checkpoint went on to an iteration metrics.csv and summary.json never had)."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [*CLI, *SANDBLASTER, "--max-iterations", "100000", "--no-plots", "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (run_dir / "metrics.csv").exists() or len(_records(run_dir, "coordinator")) < 6:
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no iteration 5 recorded"
            time.sleep(0.1)
        launcher.send_signal(signal.SIGINT)
        time.sleep(0.03)
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate(timeout=30)
    assert launcher.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "distbelief train: stopped by Ctrl-C"
    summary = _summary(run_dir)
    assert summary["outcome"] == "interrupted"
    assert summary["coordinator"]["iterations"] >= 5
    assert summary["coordinator"]["stop_reason"] == "stopped"
    record = json.loads((run_dir / "checkpoints" / "coordinator.json").read_text())
    assert record["iteration"] == summary["coordinator"]["iterations"]
    assert _records(run_dir, "coordinator")[-1]["step"] == record["iteration"]
