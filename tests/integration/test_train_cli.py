"""``distbelief train`` end to end: accuracy, run folder, exit codes, no orphaned processes."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (
    CHILD_ENV,
    CLI,
    run_cli,
    run_forked,
    run_main,
    start_shard,
    stop_processes,
)


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc (children of children included)."""
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = {int(c) for c in task.read_text().split()}
            except OSError:
                continue
            frontier.extend(children - found)
            found |= children
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _forkservers(pids: set[int]) -> set[int]:
    found = set()
    for pid in pids:
        try:
            if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            continue
    return found


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pids)


def _kill_what_is_left(launcher: subprocess.Popen, children: set[int]) -> None:
    """A test's cleanup: the launcher, the processes seen under it, and any under it now."""
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait(timeout=10)
    for pid in _alive(children | _descendants(launcher.pid)):
        os.kill(pid, signal.SIGKILL)


def _launch_long_job(run_dir: Path, *flags: str, **popen: object) -> subprocess.Popen:
    """``distbelief train`` of a job far longer than any test (100,000 steps) into ``run_dir``,
    its stderr piped: for tests that stop it."""
    return subprocess.Popen(
        [*CLI, "train", *flags, "--steps", "100000", "--out", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
        **popen,
    )


@pytest.mark.slow
def test_two_shards_two_workers_reach_90_percent_on_digits(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--workers", "2", "--shards", "2", "--epochs", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] >= 0.9
    assert "test accuracy" in result.stdout
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {row["rank"] for row in rows if row["role"] == "worker"} == {"0", "1"}
    assert any(row["role"] == "evaluator" for row in rows)
    config = json.loads((out / "config.json").read_text())
    assert (config["cluster"]["num_workers"], config["cluster"]["num_shards"]) == (2, 2)
    png = (out / "accuracy_vs_time.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # Non-interactive output is line-based: progress lines are parseable key=value records.
    progress = [line for line in result.stderr.splitlines() if line.startswith("progress ")]
    assert progress and all("=" in field for field in progress[-1].split()[1:])


def test_no_plots_draws_none_and_says_how_and_a_resume_with_plots_draws_them(tmp_path):
    run_dir = tmp_path / "run"
    first = run_forked(
        *("train", "--model", "mlp", "--steps", "3", "--no-eval", "--no-plots"),
        *("--out", str(run_dir)),
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert not list(run_dir.glob("*.png"))
    assert (
        f"INFO plots of {run_dir} not drawn (--no-plots); draw them later with: "
        f"distbelief plot {run_dir}\n"
    ) in first.stderr
    assert "WARNING" not in first.stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["reporting"]["draw_plots"] is False
    again = run_forked("train", "--resume", str(run_dir), "--plots")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "accuracy_vs_time.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((run_dir / "config.json").read_text())["reporting"]["draw_plots"]
    # Resumed again without plots: the PNGs there look current, but lack this launch's rows.
    third = run_forked("train", "--resume", str(run_dir), "--no-plots")
    assert third.returncode == 0, third.stderr[-3000:]
    assert (
        f"INFO plots of {run_dir} not drawn (--no-plots) (its PNGs are of an earlier launch); "
        f"draw them later with: distbelief plot {run_dir}\n"
    ) in third.stderr


def _ignore_sigint() -> None:
    """As a shell starts a command in the background: SIGINT ignored from the start."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("how", "started"),
    [
        (signal.SIGINT, None),
        (signal.SIGINT, _ignore_sigint),
        (signal.SIGTERM, None),
        (signal.SIGHUP, None),
        (signal.SIGKILL, None),
    ],
    ids=["SIGINT", "SIGINT-started-in-the-background", "SIGTERM", "SIGHUP", "SIGKILL"],
)
def test_stopping_the_launcher_leaves_no_process(tmp_path, how, started):
    launcher = _launch_long_job(tmp_path / "run", preexec_fn=started)
    children: set[int] = set()
    try:
        pids = tmp_path / "run" / "pids.json"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (
            pids.exists() and len(json.loads(pids.read_text() or "{}")) == 5
        ):
            time.sleep(0.2)
        children = _descendants(launcher.pid)
        assert len(children) >= 5  # 2 shards, 2 workers, 1 evaluator (some still starting)
        forkservers = _forkservers(children)
        launcher.send_signal(how)
        code = launcher.wait(timeout=30)
        if how != signal.SIGKILL:
            # Stopped in order: its forkserver, which would take seconds to unload torch once
            # the launcher is gone, is ended and reaped before the launcher exits.
            assert forkservers and not _alive(forkservers)
        assert _wait_gone(children, timeout_s=15) == set()
        if how != signal.SIGKILL:
            assert code == 130, launcher.stderr.read()[-2000:] if launcher.stderr else ""
            summary = json.loads((tmp_path / "run" / "summary.json").read_text())
            assert summary["outcome"] == "interrupted"
            assert summary["reason"] == (
                "stopped by Ctrl-C" if how == signal.SIGINT else f"stopped by signal {how.name}"
            )
    finally:
        _kill_what_is_left(launcher, children)


def _evaluated_version(run_dir: Path) -> int:
    """The last shard version the run's evaluator reported (0 before its first report)."""
    try:
        with (run_dir / "metrics.csv").open() as f:
            rows = [row for row in csv.DictReader(f) if row["role"] == "evaluator"]
        return int(rows[-1]["version"]) if rows and rows[-1]["version"] else 0
    except (OSError, KeyError, ValueError):  # not written yet, or a row being written
        return 0


def _trained_s(run_dir: Path) -> float:
    """How far into training (``time_s``) the run's workers have reported (0 before any)."""
    try:
        with (run_dir / "metrics.csv").open() as f:
            times = [float(row["time_s"]) for row in csv.DictReader(f) if row["role"] == "worker"]
        return max(times, default=0.0)
    except (OSError, KeyError, TypeError, ValueError):  # not written yet, or a row being written
        return 0.0


STOPPED_RUN_PLOTS = (
    "accuracy_vs_time.png",
    "loss_vs_time.png",
    "throughput_vs_time.png",
    "staleness.png",
)


def _assert_the_run_folder_keeps_what_was_done(run_dir: Path, outcome: str) -> None:
    """A run that did not end "done" still records, from what the launcher knew: each shard's
    workers' hosts, the staleness of the pushes so far, and the plots of metrics.csv so far."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"] == outcome
    for name, shard in summary["shards"].items():
        assert set(shard["worker_hosts"]) == {"worker0", "worker1"}, name
        assert all(shard["worker_hosts"].values()), name
    staleness = json.loads((run_dir / "staleness.json").read_text())
    assert set(staleness) == {"shard0", "shard1"}
    assert all(sum(pushes.values()) > 0 for pushes in staleness.values()), staleness
    for name in STOPPED_RUN_PLOTS:
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG"), name


def test_sigterm_to_the_launchers_group_stops_the_job_in_order(tmp_path):
    """What ``timeout`` and ``kill -TERM -PGID`` send: the launcher's processes (and their
    forkserver) are in a group of their own, so only the launcher gets it and stops the job in
    order: each shard saves its last checkpoint, not only the first one; the run folder keeps
    the plots, staleness and workers' hosts of what was done."""
    run_dir = tmp_path / "run"
    # A group of its own, which it leads: as a shell's job, or timeout's.
    launcher = _launch_long_job(run_dir, process_group=0)
    try:
        deadline = time.monotonic() + 120
        # Two seconds of training: the shards have sent many heartbeats since every worker
        # connected, not only the one that might still be on its way.
        while _evaluated_version(run_dir) < 20 or _trained_s(run_dir) < 2.0:
            assert launcher.poll() is None and time.monotonic() < deadline, "no training seen"
            time.sleep(0.2)
        os.killpg(launcher.pid, signal.SIGTERM)
        code = launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # its children follow: their lifeline ends
            launcher.wait(timeout=10)
    assert code == 130, launcher.stderr.read()[-2000:] if launcher.stderr else ""
    seen = json.loads((run_dir / "summary.json").read_text())["final"]["version"]
    staleness = json.loads((run_dir / "staleness.json").read_text())
    for shard_id in (0, 1):
        saved = json.loads((run_dir / "checkpoints" / f"shard{shard_id}.json").read_text())
        assert saved["version"] >= seen >= 20, shard_id
        # Every push the shard took, as its last checkpoint has it (it had the last heartbeat
        # before the stop's, up to half a second of pushes fewer).
        assert sum(staleness[f"shard{shard_id}"].values()) == saved["version"], shard_id
    _assert_the_run_folder_keeps_what_was_done(run_dir, "interrupted")


def test_ctrl_c_keeps_the_plots_staleness_and_worker_hosts_so_far(tmp_path):
    """Ctrl-C in the launcher's terminal (SIGINT to its group) mid-run: exit 130, and the run
    folder is as complete as a finished run's, with what was trained until then."""
    run_dir = tmp_path / "run"
    # As a shell's foreground job: Ctrl-C reaches the group.
    launcher = _launch_long_job(run_dir, "--model", "mlp", process_group=0)
    try:
        deadline = time.monotonic() + 120
        while _trained_s(run_dir) < 2.0:
            assert launcher.poll() is None and time.monotonic() < deadline, "no training seen"
            time.sleep(0.2)
        os.killpg(launcher.pid, signal.SIGINT)
        _out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=10)
    assert launcher.returncode == 130, err[-2000:]
    assert "distbelief train: stopped by Ctrl-C" in err
    assert "could not draw" not in err
    _assert_the_run_folder_keeps_what_was_done(run_dir, "interrupted")


UNCHECKED_CLI = """
import sys
from distbelief.data import loading
from distbelief.launch.cli import main

if __name__ == "__main__":  # not in the processes it starts, which import this file
    loading.check_job_data = lambda *args, **kwargs: None
    sys.exit(main(sys.argv[1:]))
"""
"""``distbelief`` without the launcher's check of the data files: a malformed line then first
meets the processes that parse it, as when a file changes after the check."""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_failing_worker_stops_the_job_and_names_itself(tmp_path, verbose):
    # A ratings file whose last line is malformed: the processes that parse it fail.
    (tmp_path / "data" / "movielens").mkdir(parents=True)
    ratings = "".join(f"{i}::{i}::4::{i}\n" for i in range(20)) + "1::x::4::20\n"
    (tmp_path / "data" / "movielens" / "ratings.dat").write_text(ratings)
    (tmp_path / "unchecked.py").write_text(UNCHECKED_CLI)
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "unchecked.py"),
            *(["--verbose"] if verbose else []),
            "train",
            *("--dataset", "movielens", "--model", "dlrm", "--data-dir", str(tmp_path / "data")),
            *("--steps", "5", "--out", str(tmp_path / "run")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=CHILD_ENV,
    )
    assert result.returncode == 1
    # Workers and the evaluator load the data set at once: whichever fails first is named.
    assert "worker" in result.stderr or "evaluator" in result.stderr
    assert "ValueError" in result.stderr
    assert "ratings.dat:21: movie id must be an integer" in result.stderr
    # By default the child's error line and where its traceback is; -v: the traceback itself.
    assert ("Traceback (most recent call last)" in result.stderr) == verbose
    if not verbose:
        saved = list((tmp_path / "run").glob("*-traceback.txt"))
        assert saved and str(saved[0]) in result.stderr
        assert "Traceback (most recent call last)" in saved[0].read_text()
    # The run folder says how the job ended, in the line the launcher printed.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["outcome"] == "failed"
    assert "failed" in summary["reason"] and "ValueError" in summary["reason"]
    assert "\n" not in summary["reason"]
    assert (summary["reason"] in result.stderr) != verbose
    assert summary["final"] == {} and summary["worker_steps"] == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "--workers", "0"],
            "distbelief train: error: argument --workers: must be an integer >= 1, got 0",
        ),
        (
            ["train", "--lr", "-1"],
            "distbelief train: error: argument --lr: must be a finite number >= 0, got -1",
        ),
        (["train", "--n-push", "-1"], "argument --n-push: must be an integer >= 1"),
        (["train", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (["train", "--steps", "5", "--epochs", "2"], "not allowed with argument"),
        (
            ["train", "--steps", "10", "--warmstart-steps", "20"],
            "argument --warmstart-steps: must be <= the 10 pushes worker 0 will make",
        ),
        (
            ["train", "--sync", "--backup-workers", "2"],
            "argument --backup-workers: must be < the number of workers (2), got 2",
        ),
        (
            ["train", "--sync", "--n-push", "5"],
            "argument --n-push: must be 1 with sync rounds (they push and pull every step), got 5",
        ),
        (
            ["ps", "--shard-id", "0", "--num-shards", "1", "--sync", "--max-staleness", "1"],
            "distbelief ps: error: argument --max-staleness: cannot bound sync rounds",
        ),
        (
            ["worker", "--ps", "tcp://nohost:99999", "--rank", "0", "--num-workers", "1"],
            "argument --ps: address 'tcp://nohost:99999': port 99999 is out of range",
        ),
        (["ps", "--shard-id", "2", "--num-shards", "2"], "--shard-id 2 is not in"),
        (
            ["ps", "--shard-id", "0", "--num-shards", "1", "--bind", "tcp://nohost", "--no-auth"],
            "'tcp://nohost' is not of the form",
        ),
        (
            ["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "3", "--num-workers", "2"],
            "--rank 3 is not in",
        ),
        (
            ["train", "--resume", "nowhere", "--workers", "3"],
            "argument --resume: nowhere: no such run folder",  # before the flags it keeps
        ),
    ],
)
def test_bad_flags_are_clear_errors(args, message, capsys):
    result = run_main(*args, capsys=capsys)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--portions", "0"], "argument --portions: must be an integer >= 1, got 0"),
        (["--history", "0"], "argument --history: must be an integer >= 1, got 0"),
        (
            ["--line-search", "nope"],
            "argument --line-search: invalid choice: 'nope' (choose from 'strong-wolfe', 'fixed')",
        ),
        (
            ["--portions", "5000"],
            "argument --portions: must be <= the batch of 1437 examples, got 5000",
        ),
        (  # the portions were not asked for: the flag typed is named
            ["--workers", "2", "--batch-size", "10"],
            "argument --batch-size: must be >= the 20 portions it is cut into (10 per worker "
            "unless --portions says otherwise), got 10",
        ),
    ],
)
def test_bad_sandblaster_flags_are_one_line_errors_and_write_nothing(
    tmp_path, flags, message, capsys
):
    run_dir = tmp_path / "run"
    result = run_main(
        "train", "--algorithm", "sandblaster", *flags, "--out", str(run_dir), capsys=capsys
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"distbelief train: error: {message}"], result.stderr
    assert not run_dir.exists()


def test_a_worker_given_another_list_of_shards_is_told_which_flag():
    shards = [start_shard(i, 2) for i in range(2)]
    try:
        addresses = [address for _, address in shards]
        for listed, problem in (
            (addresses[:1], "is one of 2 shards, but 1 was given"),
            (addresses[::-1], "serves shard 1 of 2, but it is listed as shard 0"),
        ):
            result = run_forked(
                *("worker", "--ps", ",".join(listed), "--rank", "0", "--num-workers", "1"),
                *("--model", "mlp", "--steps", "1"),
                timeout_s=120,
            )
            assert result.returncode == 2, result.stderr[-2000:]
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith("distbelief worker: error: argument --ps: shard 0 ("), last
            assert problem in last and "Traceback" not in result.stderr
    finally:
        stop_processes([process for process, _ in shards])


def test_a_worker_started_for_another_number_of_workers_than_sync_shards_is_refused():
    process, address = start_shard(0, 1, "--sync", "--num-workers", "2")
    try:
        result = run_forked(
            *("worker", "--ps", address, "--rank", "0", "--num-workers", "3"),
            *("--model", "mlp", "--dataset", "digits", "--steps", "2"),
            timeout_s=120,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"distbelief worker: error: argument --num-workers: shard 0 ({address}) runs sync "
            "rounds of 2 workers, but this worker is one of 3"
        ), last
        assert "Traceback" not in result.stderr
    finally:
        stop_processes([process])


def test_a_second_shard_of_one_id_is_refused_its_checkpoint_folder(tmp_path):
    ckpt = tmp_path / "ckpt"
    first, _ = start_shard(0, 2, "--checkpoint-dir", str(ckpt))
    processes = [first]
    try:
        result = run_forked(
            *("ps", "--shard-id", "0", "--num-shards", "2", "--bind", "tcp://127.0.0.1:0"),
            *("--no-auth", "--checkpoint-dir", str(ckpt)),
            timeout_s=120,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last == (
            f"distbelief ps: error: --checkpoint-dir {ckpt}: shard 0 is already served from this "
            f"folder (pid {first.pid}): stop it first, or give this one another folder"
        ), last
        assert "Traceback" not in result.stderr
        # The job's other shard may share the folder; the first shard's end frees it.
        processes.append(start_shard(1, 2, "--checkpoint-dir", str(ckpt))[0])
        stop_processes([first])
        processes.append(start_shard(0, 2, "--checkpoint-dir", str(ckpt))[0])
    finally:
        stop_processes(processes)


def test_a_run_folder_that_cannot_be_written_mid_run_stops_the_job_in_one_line(tmp_path):
    """The run folder made unwritable mid-run (here its tensorboard/ folder replaced by a file,
    which root cannot write into either; read-only or a full disk fail alike): the launcher
    stops the job in order and says so in one line naming the file, exit 1, no traceback;
    summary.json says so too, and no process is left."""
    run_dir = tmp_path / "run"
    launcher = _launch_long_job(run_dir)
    children: set[int] = set()
    try:
        events = run_dir / "tensorboard"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            any(events.glob("events.out.tfevents.*")) and _trained_s(run_dir) > 1.0
        ):
            time.sleep(0.2)
        assert _trained_s(run_dir) > 1.0, "the job did not start training"
        children = _descendants(launcher.pid)
        events.rename(run_dir / "tensorboard-aside")
        events.write_text("not a folder\n")
        _, stderr = launcher.communicate(timeout=90)
        assert launcher.returncode == 1, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        said = [line for line in stderr.splitlines() if line.startswith("distbelief train:")]
        # A write in the instant between the folder's move and the file's creation finds
        # neither: named the same way, with that reason.
        assert said in (
            [
                f"distbelief train: RunFolderError: cannot write {events}/"
                + said[0].split(f"{events}/", 1)[1].split(":")[0]
                + f": {reason}; the job stopped"
            ]
            for reason in ("Not a directory", "No such file or directory")
        ), stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["outcome"] == "failed"
        assert summary["reason"].startswith(f"cannot write {events}/events.out.tfevents.")
        assert _wait_gone(children, timeout_s=15) == set()
    finally:
        _kill_what_is_left(launcher, children)


def test_a_summary_that_cannot_be_written_fails_the_finished_job_in_one_line(tmp_path):
    """A job that trained to its end but cannot write summary.json (here a folder put in its
    way once the job runs: one there before is refused as it starts; a read-only folder or a
    full disk fail alike) is not done: one line naming the file, exit 1, no traceback."""
    run_dir = tmp_path / "run"
    blocked = threading.Event()

    def block_the_summary_once_started() -> None:
        deadline = time.monotonic() + 120
        while not (run_dir / "pids.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (run_dir / "summary.json" / "in-the-way").mkdir(parents=True)
        blocked.set()

    blocker = threading.Thread(target=block_the_summary_once_started, daemon=True)
    blocker.start()
    result = run_forked("train", "--model", "mlp", "--steps", "400", "--out", str(run_dir))
    blocker.join(timeout=30)
    assert blocked.is_set(), result.stderr[-3000:]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"distbelief train: RunFolderError: cannot write {run_dir / 'summary.json'}: "
        "Is a directory (the job itself finished)"
    )
