"""One job at a time in a run folder: a second holder is refused with the holder's pid, the lock
goes with its holder (however it ends), and reshard refuses a folder a job holds; one shard of an
id per checkpoint folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types

import pytest

from distbelief.config import JobConfig
from distbelief.launch import rundir as rundir_module
from distbelief.launch.reshard import reshard_run
from distbelief.launch.run_lock import run_dir_locked, shard_checkpoints_locked
from distbelief.launch.rundir import release_reserved, reserve_run_dir
from tests.conftest import run_main

HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from distbelief.launch.run_lock import run_dir_locked\n"
    "with run_dir_locked(Path(sys.argv[1]), 'x'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(300)\n"
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/run`` (killed with SIGKILL at the end)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        yield run_dir, process
    finally:
        process.kill()
        process.wait(timeout=60)


def test_a_second_holder_is_refused_naming_the_first(holder):
    run_dir, process = holder
    with pytest.raises(ValueError) as refused, run_dir_locked(run_dir, f"--resume {run_dir}"):
        pass
    assert str(refused.value) == (
        f"--resume {run_dir}: another job is using this run folder (pid {process.pid}): "
        "wait for it to end, or stop it first"
    )


def test_the_lock_goes_with_a_killed_holder(holder):
    run_dir, process = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    with run_dir_locked(run_dir, "x"):
        pass
    assert list(run_dir.iterdir()) == []  # no lock file left behind


def test_one_process_takes_it_again_after_the_block(tmp_path):
    with run_dir_locked(tmp_path, "x"):
        pass
    with run_dir_locked(tmp_path, "x"):
        pass


def test_reshard_refuses_a_run_a_job_holds(holder):
    run_dir, _ = holder
    with pytest.raises(ValueError, match="another job is using this run folder"):
        reshard_run(run_dir, 2)


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--steps", "2"],
        # A watch would append its rows to the running job's own metrics.csv. No shard listens
        # at its --ps: the refusal comes before any connection.
        ["eval", "--ps", "tcp://127.0.0.9:1"],
    ],
    ids=["train", "eval"],
)
def test_a_command_into_a_held_folder_is_refused_and_writes_nothing(holder, capsys, command):
    run_dir, process = holder
    result = run_main(*command, "--out", str(run_dir), capsys=capsys)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"distbelief {command[0]}: error: --out {run_dir}: another job is using this run "
        f"folder (pid {process.pid}): wait for it to end, or stop it first"
    )
    assert list(run_dir.iterdir()) == []


def test_shards_of_other_ids_share_a_checkpoint_folder_and_one_id_is_held_once(tmp_path):
    # flock belongs to the open file: a second open in this process is refused as well.
    with (
        shard_checkpoints_locked(tmp_path, 0),
        shard_checkpoints_locked(tmp_path, 1),
        pytest.raises(ValueError) as refused,
        shard_checkpoints_locked(tmp_path, 1),
    ):
        pass
    assert str(refused.value) == (
        f"--checkpoint-dir {tmp_path}: shard 1 is already served from this folder "
        f"(pid {os.getpid()}): stop it first, or give this one another folder"
    )
    with shard_checkpoints_locked(tmp_path, 1):  # released with the block
        pass


def test_a_shard_lock_file_goes_with_its_holder_and_one_replaced_as_it_is_taken_is_taken_anew(
    tmp_path, monkeypatch
):
    """The lock file is removed as its hold ends (a ps refused, or ended, left an empty
    shard0.lock in --checkpoint-dir). Removed by a holder letting go just as another shard
    opened it, the file that shard holds is no longer the one there: it takes the new one."""
    from distbelief.launch import run_lock

    with shard_checkpoints_locked(tmp_path, 0):
        assert (tmp_path / "shard0.lock").is_file()
    assert list(tmp_path.iterdir()) == []

    real_flock = run_lock.fcntl.flock
    let_go = []

    def holder_lets_go_first(fd: int, operation: int) -> None:
        if not let_go:  # between this open and this lock: unlinked, and made again
            let_go.append(True)
            (tmp_path / "shard0.lock").unlink()
            (tmp_path / "shard0.lock").touch()
        real_flock(fd, operation)

    monkeypatch.setattr(run_lock.fcntl, "flock", holder_lets_go_first)
    # Held is the file there now: another shard of the id opening it is refused.
    with (
        shard_checkpoints_locked(tmp_path, 0),
        pytest.raises(ValueError, match="shard 0 is already served from this folder"),
        shard_checkpoints_locked(tmp_path, 0),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_ps_refused_its_checkpoints_leaves_no_lock_file_in_the_folder(tmp_path, capsys):
    """A ps refused once it holds the folder (its checkpoint corrupt) left an empty
    shard0.lock beside the user's files."""
    (tmp_path / "shard0.json").write_text("{not json")
    before = sorted(path.name for path in tmp_path.iterdir())
    argv = ["ps", "--shard-id", "0", "--num-shards", "1", "--bind", "tcp://127.0.0.1:0"]
    result = run_main(*argv, "--no-auth", "--checkpoint-dir", str(tmp_path), capsys=capsys)
    assert result.returncode != 0
    assert "shard0.json" in result.stderr, result.stderr[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_a_ps_refused_once_it_made_its_checkpoint_folder_leaves_none(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from distbelief.launch import cli

    def refused(*_args: object, **_kwargs: object) -> None:
        assert (tmp_path / "new" / "ps" / "shard0.lock").is_file()  # held as it serves
        raise ValueError("--bind: refused as it was bound")  # a port taken in between, say

    monkeypatch.setattr(
        cli, "import_with_signals_deferred", lambda *_: SimpleNamespace(serve_job_shard=refused)
    )
    argv = ["ps", "--shard-id", "0", "--num-shards", "1", "--bind", "tcp://127.0.0.1:0"]
    folder = tmp_path / "new" / "ps"
    result = run_main(*argv, "--no-auth", "--checkpoint-dir", str(folder), capsys=capsys)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refused as it was bound" in result.stderr
    # The folder named goes, and so do the folders above it it made, as eval --out's do.
    assert list(tmp_path.iterdir()) == []


def test_a_shard_lock_that_cannot_be_opened_is_refused_naming_the_folder(tmp_path):
    (tmp_path / "shard0.lock").mkdir()
    with pytest.raises(ValueError) as refused, shard_checkpoints_locked(tmp_path, 0):
        pass
    assert str(refused.value) == (
        f"--checkpoint-dir {tmp_path}: cannot open shard0.lock there to hold shard 0's "
        "checkpoints (Is a directory)"
    )


def test_resume_of_a_folder_a_reshard_holds_mid_swap_is_refused_as_held(holder, capsys):
    # Between its two renames a live reshard leaves checkpoints.old-* and no checkpoints/:
    # read before the lock, that looked like a reshard cut off, to be renamed back by hand.
    run_dir, process = holder
    (run_dir / "config.json").write_text(JobConfig().to_json())
    (run_dir / "checkpoints.old-1a2b3c4d").mkdir()
    before = sorted(path.name for path in run_dir.iterdir())
    result = run_main("train", "--resume", str(run_dir), "--shards", "3", capsys=capsys)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"distbelief train: error: --resume {run_dir}: another job is using this run folder "
        f"(pid {process.pid}): wait for it to end, or stop it first"
    )
    assert sorted(path.name for path in run_dir.iterdir()) == before


def test_a_hold_lent_within_is_taken_again_within_and_no_other_is(tmp_path):
    # A resume holds its folder from before it reads config.json, then reshards and runs
    # the job there, each of which takes it too.
    with run_dir_locked(tmp_path, "x", lend_within=True), run_dir_locked(tmp_path, "y"):
        pass
    with run_dir_locked(tmp_path, "x"):  # released with the outer block
        pass
    # A hold not lent is another holder's, in this process too (a second node's script of
    # one rank started in the same process, say).
    with (
        run_dir_locked(tmp_path, "x"),
        pytest.raises(ValueError, match=r"^y: another job"),
        run_dir_locked(tmp_path, "y"),
    ):
        pass


def test_a_job_refused_a_folder_another_made_in_the_same_instant_leaves_it(
    tmp_path, monkeypatch, capsys
):
    """Two ``train --out RUN`` at once, RUN missing for both: the one refused by the lock must
    not remove the folder the other holds (as a job removes a folder it made and left
    unused)."""
    import distbelief.launch.job as job_module

    run_dir = tmp_path / "run"
    made_by = job_module.prepare_run_dir
    others: list[subprocess.Popen] = []

    def made_and_taken_by_another(out_dir):
        made = made_by(out_dir)  # missing when this job looked: it counts as its own
        other = subprocess.Popen([sys.executable, "-c", HOLD, str(made)], stdout=subprocess.PIPE)
        others.append(other)
        assert other.stdout.readline().strip() == b"held"
        (made / "config.json").write_text("{}")  # the other job's
        return made

    monkeypatch.setattr(job_module, "prepare_run_dir", made_and_taken_by_another)
    try:
        result = run_main("train", "--steps", "2", "--out", str(run_dir), capsys=capsys)
    finally:
        for other in others:
            other.kill()
            other.wait(timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "another job is using this run folder" in result.stderr
    assert [path.name for path in run_dir.iterdir()] == ["config.json"]


def test_launches_in_one_second_each_get_a_run_folder_of_their_own(tmp_path, monkeypatch):
    """The default run folder was ``runs/<time>`` alone: two ``train`` started in the same
    second shared it, and the second was refused (``--out runs/...: another job is using this
    run folder``) though no --out was given."""
    monkeypatch.chdir(tmp_path)
    one_second = types.SimpleNamespace(strftime=lambda _format: "20261207-233633")
    monkeypatch.setattr(rundir_module, "time", one_second)
    folders = [reserve_run_dir() for _ in range(3)]
    names = ["20261207-233633", "20261207-233633-2", "20261207-233633-3"]
    assert [str(folder) for folder in folders] == [f"runs/{name}" for name in names]
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == names
    # A launch's own folder, left empty, goes as its launch is refused; one in use stays.
    (folders[1] / "config.json").write_text("{}")
    for folder in folders:
        release_reserved(folder)
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == [names[1]]


def test_a_train_refused_by_its_checks_leaves_no_default_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = run_main(
        "train", "--dataset", "mnist", "--no-download", "--data-dir", "data", capsys=capsys
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "argument --data-dir" in result.stderr
    assert not (tmp_path / "runs").exists()
