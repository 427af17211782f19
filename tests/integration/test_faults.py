"""Failures the project claims to survive, caused for real: SIGKILL of a worker and of a shard
during training, a shard that stays dead, resuming from checkpoints, corrupt checkpoints."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.config import JobConfig
from distbelief.errors import (
    ModelMismatchError,
    ShardEmptyError,
    ShardTimeoutError,
    ShardUnavailableError,
)
from distbelief.optim import DownpourSGD
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.telemetry import read_metrics
from distbelief.worker import build_replica
from tests.conftest import (
    CHILD_ENV,
    CLI,
    check_ctrl_c_ends_promptly_with_the_shard_gone,
    pause_process,
    private_loopback,
    run_forked,
    run_main,
    start_shard,
    stop_processes,
)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _worker_steps(run_dir: Path) -> dict[int, int]:
    steps: dict[int, int] = {}
    path = run_dir / "metrics.csv"
    if not path.exists():
        return steps
    for row in read_metrics(path):
        if row["role"] == "worker":
            steps[row["rank"]] = max(steps.get(row["rank"], 0), row["step"])
    return steps


def _trained_s(run_dir: Path) -> float:
    """How far into training (``time_s``) the run's workers have reported (0 before any)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return 0.0
    return max(
        (row["time_s"] for row in read_metrics(path) if row["role"] == "worker"), default=0.0
    )


def _kill(run_dir: Path, name: str) -> None:
    os.kill(json.loads((run_dir / "pids.json").read_text())[name], signal.SIGKILL)


def _stderr_once_ended(launcher: subprocess.Popen, timeout_s: float, after: str) -> str:
    """The launcher's stderr once it has ended, which it must within ``timeout_s`` of
    ``after`` (what let the job go on)."""
    try:
        return launcher.communicate(timeout=timeout_s)[1]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still ran {timeout_s:g} s after {after}")


@contextlib.contextmanager
def _training(run_dir: Path, *args: str, plots: bool = False) -> Iterator[subprocess.Popen]:
    """``distbelief train ARGS --out RUN_DIR`` (with ``--no-plots`` unless ``plots``: what
    these tests check is in the records), killed if it still runs on the way out."""
    no_plots = [] if plots else ["--no-plots"]
    launcher = subprocess.Popen(
        [*CLI, "train", *args, *no_plots, "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        yield launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(300)  # an 800-step job with two restarts: over 80 s on a busy machine
def test_job_survives_sigkill_of_a_worker_and_of_a_shard(tmp_path):
    run_dir = tmp_path / "run"
    job = ("--steps", "800", "--checkpoint-every", "1", "--eval-every", "0.5")
    with _training(run_dir, *job) as launcher:
        _wait_for(
            lambda: min(_worker_steps(run_dir).values(), default=0) >= 100,
            120,
            "both workers to train",
        )
        _kill(run_dir, "worker1")
        before = _worker_steps(run_dir)[0]
        _wait_for(
            lambda: _worker_steps(run_dir)[0] >= before + 100,
            60,
            "worker 0 to keep training while worker 1 is down",
        )
        _kill(run_dir, "shard0")
        _out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    faults = {fault["process"]: fault for fault in summary["faults"]}
    assert faults["worker1"]["action"] == faults["shard0"]["action"] == "restarted"
    assert summary["worker_steps"] == {"0": 800, "1": 800}
    assert summary["final"]["test_accuracy"] >= 0.85
    # Lost updates are bounded by the checkpoint interval: the restored version is at least
    # the version the PS had a checkpoint interval (plus a heartbeat) before the kill.
    shard = faults["shard0"]
    assert shard["version_restored"] is not None and shard["lost_updates"] is not None
    evals = [r for r in read_metrics(run_dir / "metrics.csv") if r["role"] == "evaluator"]
    older = [r["version"] for r in evals if r["time_s"] <= shard["time_s"] - 2.5]
    assert shard["version_restored"] >= max(older, default=0)
    assert "shard0 died" in err and "restarted" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sync_rounds_lost_with_a_shard_count_every_round_a_worker_saw(tmp_path):
    """Under sync rounds a restart loses the rounds since the checkpoint, and nothing is
    re-sent: the lost updates are the versions between the restored one and the last one any
    process saw, the workers' last replies from the dead shard among them (the launcher's
    heartbeats miss the rounds of their last quarter second)."""
    run_dir = tmp_path / "run"
    job = ("--model", "mlp", "--no-eval", "--sync", "--workers", "2", "--shards", "2")
    # 1000 rounds: the kill at round 200 lands with both workers still training (both must
    # find the restart) even when the metrics the test reads lag seconds behind. Shard 0 lives
    # on: the workers' rounds go on against a restored shard behind the other one.
    job += ("--steps", "1000", "--checkpoint-every", "1")
    with _training(run_dir, *job) as launcher:
        saved = run_dir / "checkpoints" / "shard1.json"
        _wait_for(
            lambda: saved.exists() and min(_worker_steps(run_dir).values(), default=0) >= 200,
            120,
            "a checkpoint and 200 rounds",
        )
        _kill(run_dir, "shard1")
        _out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    [fault] = summary["faults"]
    assert (fault["process"], fault["action"]) == ("shard1", "restarted")
    assert summary["worker_steps"] == {"0": 1000, "1": 1000}
    assert (fault["updates_replayed"], fault["pushes_resent"]) == (0, 0)
    assert fault["lost_updates"] == fault["version_before"] - fault["version_restored"]
    # What the workers saw of the dead shard: their metrics before its death was noticed (the
    # restarted shard answered none of those), and what each told the restarted one.
    rows = read_metrics(run_dir / "metrics.csv")
    metrics_seen = [
        r["version"] for r in rows if r["role"] == "worker" and r["time_s"] < fault["time_s"]
    ]
    reported = [int(v) for v in re.findall(r"this worker saw version (\d+) before", err)]
    assert len(reported) == 2, err[-3000:]  # each worker found the restart
    assert fault["version_before"] >= max(metrics_seen + reported)


def _pushes_taken(run_dir: Path) -> dict[str, int]:
    """Per shard, the pushes it took (a retried one once): its staleness histogram's total."""
    staleness = json.loads((run_dir / "staleness.json").read_text())
    return {shard: sum(pushes.values()) for shard, pushes in staleness.items()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_restarted_worker_goes_on_after_its_last_push_so_no_step_is_pushed_twice(tmp_path):
    """Worker 1 killed mid-run: its next life goes on after the last push the shard took from
    the dead one (not at its last report, up to 9 steps before), so the shard takes each step
    of each worker once: 2 x 1000 pushes with --n-push 1, none twice and none skipped."""
    run_dir = tmp_path / "run"
    steps = 1000
    job = ("--model", "mlp", "--no-eval", "--workers", "2", "--shards", "1", "--n-push", "1")
    with _training(run_dir, *job, "--steps", str(steps)) as launcher:
        _wait_for(
            lambda: (
                min(_worker_steps(run_dir).values(), default=0) >= 200
                and len(_worker_steps(run_dir)) == 2
            ),
            120,
            "both workers to train 200 steps",
        )
        _kill(run_dir, "worker1")
        _out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    [fault] = summary["faults"]
    assert (fault["process"], fault["action"]) == ("worker1", "restarted")
    assert 200 <= fault["resumed_at_step"] < steps
    assert summary["worker_steps"] == {"0": steps, "1": steps}
    # The dead life's pushes the shard took, and the next life's from the step after.
    assert _pushes_taken(run_dir) == {"shard0": 2 * steps}
    rows = read_metrics(run_dir / "metrics.csv")
    after = [r["step"] for r in rows if r["role"] == "worker" and r["rank"] == 1]
    assert after[-1] == steps


@pytest.mark.slow
def test_a_shard_given_up_ends_the_run_with_a_failed_summary(tmp_path):
    run_dir = tmp_path / "run"
    job = ("--model", "mlp", "--steps", "100000", "--max-restarts", "0")
    with _training(run_dir, *job, plots=True) as launcher:
        # Two seconds of training too: the shards have sent many heartbeats since every
        # worker connected, not only the one that might still be on its way.
        _wait_for(
            lambda: (
                min(_worker_steps(run_dir).values(), default=0) >= 20
                and len(_worker_steps(run_dir)) == 2
                and _trained_s(run_dir) >= 2.0
            ),
            90,
            "both workers to train",
        )
        _kill(run_dir, "shard0")
        _out, err = launcher.communicate(timeout=90)
    assert launcher.returncode == 1, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"] == "failed"
    assert summary["reason"] == "shard0 failed (exit code -9): died and was not restarted"
    assert summary["reason"] in err
    [fault] = summary["faults"]
    assert (fault["process"], fault["action"]) == ("shard0", "given up")
    # What was known when it ended: the workers' steps, the shards' addresses.
    assert set(summary["worker_steps"]) == {"0", "1"}
    assert min(summary["worker_steps"].values()) >= 20
    assert set(summary["shards"]) == {"shard0", "shard1"}
    assert all(shard["address"].startswith("tcp://") for shard in summary["shards"].values())
    assert {"final", "elapsed_s"} <= set(summary)
    # And what the shards reported last (shard0 before it died): where the workers connected
    # from and the staleness so far; the plots of the metrics so far.
    for shard in summary["shards"].values():
        assert set(shard["worker_hosts"]) == {"worker0", "worker1"}
    staleness = json.loads((run_dir / "staleness.json").read_text())
    assert set(staleness) == {"shard0", "shard1"}
    assert all(sum(pushes.values()) > 0 for pushes in staleness.values())
    for name in ("accuracy_vs_time.png", "loss_vs_time.png", "staleness.png"):
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG"), name
    assert "could not draw" not in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker0_given_up_during_its_warm_start_lets_the_others_start_at_once(tmp_path):
    """With --warmstart-steps the other workers wait for worker 0's first updates. Worker 0
    killed for good before it made them, they start at once from the parameters as they are
    and the job ends with them (they waited out their 300 s hold timeout, then failed)."""
    run_dir = tmp_path / "run"
    # Worker 0 needs seconds for its warm start (it is killed at its first reported steps, at
    # most tens of them), so the kill lands in it; worker 1 then trains them all alone.
    steps = 1000
    job = ("--model", "mlp", "--steps", str(steps), "--warmstart-steps", str(steps))
    with _training(run_dir, *job, "--max-restarts", "0", "--no-eval") as launcher:
        _wait_for(lambda: 0 in _worker_steps(run_dir), 120, "worker 0 to train")
        _kill(run_dir, "worker0")
        killed = time.monotonic()
        err = _stderr_once_ended(launcher, 120, "worker 0 was given up")
    ended_after_s = time.monotonic() - killed
    assert launcher.returncode == 0, err[-3000:]
    assert "worker0 died (exit code -9); given up" in err
    assert "worker0 was given up during its warm start: the other workers start now" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"] == "done"
    assert [(f["process"], f["action"]) for f in summary["faults"]] == [("worker0", "given up")]
    assert summary["worker_steps"]["1"] == steps
    assert summary["worker_steps"]["0"] < steps
    assert ended_after_s < 120


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_shard_restarted_as_worker0_is_given_up_learns_its_warm_start_ended(tmp_path):
    """The one shard of the job and worker 0, for the second time, die together: the launcher
    ends the warm start while the shard restarts (it cannot be told then, and a restarted shard
    knows nothing of it). Told once it listens again, it lets worker 1 start at once (it waited
    out its 300 s hold timeout)."""
    run_dir = tmp_path / "run"
    # Worker 0 needs seconds for its warm start (the kills come at its first reported steps
    # and at its restart), so they land in it; worker 1 then trains them all alone.
    steps = 1000
    job = ("--model", "mlp", "--shards", "1", "--no-eval", "--max-restarts", "1")
    job += ("--steps", str(steps), "--warmstart-steps", str(steps))
    with _training(run_dir, *job) as launcher:
        _wait_for(lambda: 0 in _worker_steps(run_dir), 120, "worker 0 to train")
        first = json.loads((run_dir / "pids.json").read_text())["worker0"]
        _kill(run_dir, "worker0")
        _wait_for(
            lambda: json.loads((run_dir / "pids.json").read_text())["worker0"] != first,
            60,
            "worker 0 to restart",
        )
        _kill(run_dir, "shard0")
        _kill(run_dir, "worker0")
        killed = time.monotonic()
        err = _stderr_once_ended(launcher, 120, "worker 0 was given up")
    ended_after_s = time.monotonic() - killed
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"] == "done"
    faults = sorted((f["process"], f["action"]) for f in summary["faults"])
    assert faults == [("shard0", "restarted"), ("worker0", "given up"), ("worker0", "restarted")]
    assert summary["worker_steps"]["1"] == steps
    assert "worker0 was given up during its warm start" in err
    assert ended_after_s < 120


_KILLED_SAVE = """
import sys
import time
from pathlib import Path

import torch

import distbelief.server.checkpoint as checkpoint


def save_file_that_hangs(tensors, filename):
    # What safetensors' save_file does first: a temporary of its own beside the file it is
    # given (renamed to that file once written). The writer is killed while it holds it.
    (Path(filename).parent / ".tmpK6ephO").write_bytes(bytes(4096))
    print("saving", flush=True)
    time.sleep(600)


checkpoint.save_file = save_file_that_hangs
checkpoint.write_tensor_file(Path(sys.argv[1]), {"param": torch.zeros(4)})
"""


def _save_killed_midway(folder: Path) -> list[str]:
    """Starts writing a shard's tensor file into ``folder`` and SIGKILLs the writer while
    safetensors' own temporary (``.tmpXXXXXX``) is being written; returns what it left."""
    folder.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(folder / "shard0-v000000000001.safetensors")],
        stdout=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        assert writer.stdout.readline() == "saving\n", "the save never began"
        writer.kill()
    finally:
        stop_processes([writer])
    return sorted(os.listdir(folder))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_shard_killed_while_saving_leaves_nothing_once_restarted(tmp_path):
    """A shard killed in the middle of a checkpoint leaves its temporaries (a whole slice's
    worth, for safetensors writes the file in full before it is renamed); they are named after
    the shard's files, and the shard restarted from that folder removes them."""
    left = _save_killed_midway(tmp_path / "killed")
    assert left and all(name.startswith(".shard0-v000000000001.safetensors.") for name in left)
    assert all(name.endswith(".tmp") for name in left)
    run_dir = tmp_path / "run"
    # 1000 steps: the kill at step 100 or so leaves the workers hundreds more to train, in
    # which the shard is restarted.
    job = ("--model", "mlp", "--steps", "1000", "--checkpoint-every", "1", "--no-eval")
    with _training(run_dir, *job) as launcher:
        _wait_for(
            lambda: (
                min(_worker_steps(run_dir).values(), default=0) >= 100
                and len(_worker_steps(run_dir)) == 2
            ),
            120,
            "both workers to train",
        )
        for name in left:
            os.rename(tmp_path / "killed" / name, run_dir / "checkpoints" / name)
        _kill(run_dir, "shard0")
        _out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(f["process"], f["action"]) for f in summary["faults"]] == [("shard0", "restarted")]
    assert summary["worker_steps"] == {"0": 1000, "1": 1000}
    files = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert [name for name in files if name.startswith(".")] == [], files


def _blocking_linear(address: str, **options) -> tuple[nn.Module, DownpourSGD]:
    """A small model and its blocking DownpourSGD against the shard at ``address``."""
    model = nn.Linear(4, 2)
    options = {"timeout_s": 30, **options}
    return model, DownpourSGD(
        model.parameters(), lr=0.1, model=model, ps=[address], blocking=True, **options
    )


def _steps(model: nn.Module, optimizer: DownpourSGD, count: int) -> None:
    for _ in range(count):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_to_a_shard_saves_its_checkpoint_on_the_way_out(tmp_path, signum):
    """``distbelief ps`` stopped by SIGTERM (what ``kill`` and service managers send) saves
    what it applied since its last periodic checkpoint, as Ctrl-C does; so does a hang-up (its
    terminal or ssh session closed), which ended it on the spot, exit 129, nothing saved."""
    checkpoints = tmp_path / "checkpoints"
    # A periodic save far away: only the shutdown's can hold the pushes below. Started as users
    # start it (the other tests fork their shards): the command's own start, serving and exit.
    process, address = start_shard(
        0, 1, "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "3600", forked=False
    )
    try:
        model, optimizer = _blocking_linear(address)
        _steps(model, optimizer, 7)
        optimizer.close()
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        stop_processes([process])
    assert process.returncode == 130
    assert json.loads((checkpoints / "shard0.json").read_text())["version"] == 7


def test_a_shard_that_cannot_save_its_last_checkpoint_says_so_in_one_line(tmp_path):
    """``distbelief ps`` stopped by SIGTERM whose checkpoint folder is gone (here replaced by a
    file, as a disk unmounted under it would be) cannot save what it applied since: one line
    naming the folder, exit 1 (not 130: the shard did not stop as asked), no traceback."""
    checkpoints = tmp_path / "checkpoints"
    process, address = start_shard(
        0, 1, "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "3600"
    )
    try:
        model, optimizer = _blocking_linear(address)
        _steps(model, optimizer, 3)
        optimizer.close()
        checkpoints.rename(tmp_path / "aside")
        checkpoints.write_text("not a folder")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        said = process.stderr_tail(lines=50)
    finally:
        stop_processes([process])
    assert process.returncode == 1, said
    assert "Traceback" not in said, said
    assert said.splitlines()[-1] == (
        f"distbelief ps: FileExistsError: [Errno 17] File exists: '{checkpoints}'"
    ), said


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_stop_signal_does_not_cut_the_shards_last_checkpoint(tmp_path, second):
    """Ctrl-C pressed twice (or SIGTERM after it, as a service manager sends it) while a
    ``distbelief ps`` stops, its worker still connected: the stop still ends with the last
    checkpoint saved, then the process exits 130."""
    checkpoints = tmp_path / "checkpoints"
    process, address = start_shard(
        0, 1, "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "3600", forked=False
    )
    model, optimizer = _blocking_linear(address, retry_timeout_s=1)
    try:
        _steps(model, optimizer, 7)
        # The worker stays connected: the shard's stop closes its connection before saving.
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        process.send_signal(second)
        process.wait(timeout=60)
    finally:
        stop_processes([process])
        with contextlib.suppress(ShardUnavailableError, ShardTimeoutError):
            optimizer.close()
    assert process.returncode == 130
    assert json.loads((checkpoints / "shard0.json").read_text())["version"] == 7


def test_a_shard_restarted_with_no_checkpoint_says_its_parameters_are_lost():
    """A ``distbelief ps`` without --checkpoint-dir, killed and started again at its address,
    has nothing to restore: a worker's next push is refused with ShardEmptyError saying so
    (and how to keep a shard's parameters across restarts), not told to initialise it. A new
    worker is refused too: filling the empty shard from its own model would mix new
    parameters into the trained half without a word."""
    shard0, address0 = start_shard(0, 2)
    bind = ("--bind", f"tcp://{private_loopback()}:0")  # restarted at its address
    shard1, address1 = start_shard(1, 2, *bind)
    processes = [shard0, shard1]
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = DownpourSGD(
        model.parameters(), lr=0.1, model=model, ps=[address0, address1], blocking=True
    )
    try:
        _steps(model, optimizer, 2)
        shard1.kill()
        shard1.wait(timeout=30)
        restarted, _ = start_shard(1, 2, "--bind", address1)
        processes.append(restarted)
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        with pytest.raises(ShardEmptyError, match="restarted with no checkpoint") as refused:
            optimizer.step()
        assert "--checkpoint-dir" in str(refused.value)
        fresh = nn.Linear(4, 2)
        with pytest.raises(ShardEmptyError) as refused:
            DownpourSGD(fresh.parameters(), lr=0.1, model=fresh, ps=[address0, address1])
        # 3: the two steps', and the refused step's, which shard 0 took.
        assert str(refused.value).startswith(
            f"shard 1 ({address1}) holds no parameters while shard 0 ({address0}) has applied "
            "3 updates: restarted with no checkpoint"
        )
    finally:
        optimizer.close()
        stop_processes(processes)


def test_a_shard_restarted_from_another_models_checkpoint_is_a_model_mismatch(tmp_path):
    """A ``distbelief ps`` started again at its address on another model's checkpoint folder:
    the worker's re-send of what it lacks was refused with a RemoteError about slices that do
    not fit, naming no tensor; it is a ModelMismatchError, as for a new worker."""
    other = tmp_path / "other"
    shard, address = start_shard(0, 1, "--checkpoint-dir", str(other))
    try:
        model = nn.Linear(5, 3)  # the other model, whose checkpoint the shard saves
        DownpourSGD(model.parameters(), lr=0.1, model=model, ps=[address], timeout_s=30).close()
    finally:
        stop_processes([shard])
    bind = ("--bind", f"tcp://{private_loopback()}:0")  # restarted at its address
    checkpoints = ("--checkpoint-dir", str(tmp_path / "ours"), "--checkpoint-every", "3600")
    shard, address = start_shard(0, 1, *bind, *checkpoints)
    processes = [shard]
    model, optimizer = _blocking_linear(address)
    try:
        _steps(model, optimizer, 2)
        shard.kill()
        shard.wait(timeout=30)
        restarted, _ = start_shard(0, 1, "--bind", address, "--checkpoint-dir", str(other))
        processes.append(restarted)
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        with pytest.raises(ModelMismatchError, match="'weight'"):
            optimizer.step()
    finally:
        optimizer.close()
        stop_processes(processes)


def test_a_worker_whose_hellos_straddle_another_workers_start_is_not_refused():
    """A worker's hellos are answered at different moments: another worker filled both shards
    and pushed between the answer of shard 0 (empty then) and that of shard 1 (trained by
    then). The worker was refused with ShardEmptyError, failing a job with no fault (1 of 105
    launches of 2 workers and 2 shards)."""
    shard0, address0 = start_shard(0, 2)
    shard1, address1 = start_shard(1, 2)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    specs = tensor_specs(model.named_parameters())
    late = ParameterServerClient([address0, address1], specs, timeout_s=30)
    real_hello = late._hello
    shard0_answered = threading.Event()
    others = []

    def straddled_hello(shard_id: int) -> dict:
        if shard_id == 0 and not shard0_answered.is_set():
            try:
                return real_hello(0)
            finally:
                shard0_answered.set()
        if shard_id == 1 and not others:
            assert shard0_answered.wait(30)
            other = nn.Linear(4, 2)
            others.append(
                DownpourSGD(
                    other.parameters(),
                    lr=0.1,
                    model=other,
                    ps=[address0, address1],
                    blocking=True,
                )
            )
            _steps(other, others[0], 1)
        return real_hello(shard_id)

    late._hello = straddled_hello
    try:
        assert late.handshake(FlatLayout(specs).allocate()) is False  # the other filled both
        assert late.versions == [1, 1]  # each as asked last, shard 0 asked again
    finally:
        late.close()
        for optimizer in others:
            optimizer.close()
        stop_processes([shard0, shard1])


def _downpour(model: nn.Module, address: str, **options) -> DownpourSGD:
    # timeout_s not 1 s: a busy machine's fresh shard can take longer to answer the handshake.
    # The failures the tests wait for do not wait for it: a stopped shard refuses connections.
    return DownpourSGD(
        model.parameters(), lr=0.1, model=model, ps=[address], timeout_s=10, **options
    )


def test_worker_fails_clearly_when_a_shard_stays_dead():
    process, address = start_shard(0, 1, "--server-lr", "0.1")
    try:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        optimizer = _downpour(model, address, blocking=True, retry_timeout_s=2)
        stop_processes([process])
        model(torch.randn(3, 4)).sum().backward()
        started = time.monotonic()
        with pytest.raises(ShardUnavailableError, match=r"shard 0 .*gave up after retrying"):
            optimizer.step()
        assert time.monotonic() - started < 10
    finally:
        stop_processes([process])


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_a_stopped_shard_fails_a_request_with_a_timeout_error(transport, monkeypatch):
    """A shard stopped with SIGSTOP takes connections (the kernel does) and never answers:
    after the retries the request fails as one not answered in time, not as an unreachable
    shard. Under auto the connection is shared memory, whose first request asks the shard to
    share its parameters."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", transport)
    process, address = start_shard(0, 1, "--server-lr", "0.1")
    specs = tensor_specs([("w", torch.zeros(8))])
    try:
        client = ParameterServerClient([address], specs, timeout_s=30, retry_timeout_s=2)
        try:
            client.handshake(FlatLayout(specs).allocate())
            # Set once the shard has answered: the failure waited for is the only wait it bounds.
            client.timeout_s = 2.0
            pause_process(process.pid)
            started = time.monotonic()
            with pytest.raises(ShardTimeoutError, match=r"shard 0 .*gave up after retrying"):
                # A push: a pull may read the shard's shared parameters with no request.
                client.push_now({torch.float32: torch.ones(8)}, clock=1)
            assert time.monotonic() - started < 30
        finally:
            os.kill(process.pid, signal.SIGCONT)
            client.close(wait=False)
    finally:
        stop_processes([process])


def test_close_after_a_shard_stayed_dead_does_not_retry_again():
    """step() waited out retry_timeout_s and raised; close() must not wait it out again (for
    the unsent gradient, or for a queued pull still retrying)."""
    retry_timeout_s = 4.0
    process, address = start_shard(0, 1, "--server-lr", "0.1")
    try:
        model = nn.Linear(4, 2)
        optimizer = _downpour(model, address, retry_timeout_s=retry_timeout_s)
        stop_processes([process])
        with pytest.raises(ShardUnavailableError, match="gave up after retrying"):
            for _ in range(100):  # a push and a pull queued each step, until one gives up
                optimizer.zero_grad()
                model(torch.randn(3, 4)).sum().backward()
                optimizer.step()
        started = time.monotonic()
        optimizer.close()
        # Not a second round of retries (which alone takes retry_timeout_s); the rest of the
        # bound is room for a busy machine.
        assert time.monotonic() - started < retry_timeout_s - 0.5
    finally:
        stop_processes([process])


def test_resume_restores_exactly_the_saved_parameters_and_refuses_a_corrupt_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = run_forked("train", "--steps", "30", "--no-plots", "--out", str(run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    saved = {
        i: load_file(str(next(checkpoints.glob(f"shard{i}-v*.safetensors")))) for i in range(2)
    }
    shards = [start_shard(i, 2, "--checkpoint-dir", str(checkpoints)) for i in range(2)]
    try:
        config = JobConfig.from_file(run_dir / "config.json")
        model = build_replica(config, (1, 32, 32), 10)
        layout = FlatLayout(tensor_specs(model.named_parameters()))
        client = ParameterServerClient([a for _, a in shards], layout.specs, timeout_s=5)
        client.handshake(None)
        flats = layout.allocate()
        versions = client.wait(client.pull(flats))
        client.close()
    finally:
        stop_processes([p for p, _ in shards])
    assert versions == [60, 60]
    for shard_id, pieces in enumerate(client.slices):
        for piece in pieces:
            assert torch.equal(
                flats[piece.dtype][piece.start : piece.stop], saved[shard_id]["param.0"]
            )
    again = run_forked("train", "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["final"]["version"] == 120

    # The same run folder, misused: reused without --resume, resumed from a corrupt file.
    reuse = run_main("train", "--steps", "5", "--out", str(run_dir), capsys=capsys)
    assert reuse.returncode == 2 and "use --resume" in reuse.stderr
    [tensor_file] = (run_dir / "checkpoints").glob("shard1-v*.safetensors")  # the one kept
    tensor_file.write_bytes(tensor_file.read_bytes()[:-7])
    resumed = run_main("train", "--resume", str(run_dir), capsys=capsys)
    assert resumed.returncode != 0
    assert tensor_file.name in resumed.stderr and "corrupt" in resumed.stderr
    missing = run_main("train", "--resume", str(tmp_path / "nothing"), capsys=capsys)
    assert missing.returncode == 2 and "nothing" in missing.stderr


_USER_LOOP = """
import sys, torch
from torch import nn
from distbelief.optim import DownpourSGD
model = nn.Linear(4, 2)
optimizer = DownpourSGD(model.parameters(), lr=0.1, model=model, ps=[sys.argv[1]],
                        n_push=1, n_pull=1, timeout_s=1, retry_timeout_s=60)
print("training", flush=True)
for step in range(10**9):
    optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
"""


_USER_WITH_LOOP = """
import sys, torch
from torch import nn
from distbelief.optim import DownpourSGD
model = nn.Linear(4, 2)
with DownpourSGD(model.parameters(), lr=0.1, model=model, ps=[sys.argv[1]],
                 n_push=1, n_pull=1, timeout_s=1, retry_timeout_s=60) as optimizer:
    print("training", flush=True)
    for step in range(10**9):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
"""


@pytest.mark.parametrize("loop", [_USER_LOOP, _USER_WITH_LOOP], ids=["loop", "with-block"])
def test_ctrl_c_in_a_user_loop_exits_promptly_while_a_shard_is_down(loop):
    """Also in ``with DownpourSGD(...)``, whose exit closed the optimizer with a flush that
    waited out the 60 s of retries and then raised ShardUnavailableError over the Ctrl-C."""
    check_ctrl_c_ends_promptly_with_the_shard_gone(loop, "--server-lr", "0.1")
