"""The file a failed process's traceback is saved to in its run folder: whole, or none."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from distbelief.errors import ChildFailedError
from distbelief.launch.cli_errors import save_traceback

_TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad\n'


def test_a_failed_processs_traceback_is_saved_whole(tmp_path):
    path = save_traceback(ChildFailedError("shard 0", 1, _TRACEBACK), tmp_path)
    assert path == tmp_path / "shard_0-traceback.txt"
    assert path.read_text() == _TRACEBACK


def test_a_full_disk_leaves_no_empty_traceback_file(tmp_path, monkeypatch, caplog):
    """Written in place, a write refused part way (the disk full) left an empty file that
    looked like a process failing with nothing to say."""
    real_write_text = Path.write_text

    def disk_full(self: Path, text: str, *args: object, **kwargs: object) -> int:
        real_write_text(self, "", *args, **kwargs)  # opened (made), then nothing fits
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    with caplog.at_level(logging.WARNING):
        assert save_traceback(ChildFailedError("shard 0", 1, _TRACEBACK), tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    assert "could not write" in caplog.text and "shard_0-traceback.txt" in caplog.text


def test_a_second_ctrl_c_as_a_stop_ends_says_the_stop_summary_json_recorded(capsys):
    """A second Ctrl-C that landed after the first stop was recorded (as the launcher's
    ``LauncherInterrupted`` went up) printed ``interrupted``, summary.json's reason ``stopped
    by Ctrl-C``."""
    import argparse

    from distbelief.errors import LauncherInterrupted
    from distbelief.launch.cli_errors import run_reporting_failures

    def stopped_twice() -> int:
        try:
            raise LauncherInterrupted("stopped by signal SIGTERM")
        except LauncherInterrupted:
            raise KeyboardInterrupt from None  # the second, as the first is on its way out

    args = argparse.Namespace(command="train", verbose=False)
    assert run_reporting_failures(args, stopped_twice) == 130
    assert capsys.readouterr().err == "distbelief train: stopped by signal SIGTERM\n"

    def stopped_once() -> int:
        raise KeyboardInterrupt

    assert run_reporting_failures(args, stopped_once) == 130
    assert capsys.readouterr().err == "distbelief train: interrupted\n"


def test_a_child_that_timed_out_is_followed_by_the_flag_of_the_timeout(capsys):
    """``--timeout 0.001`` failed the workers with a line that blamed the peer (``answered
    nothing: a shard stopped or too busy``) and never named the flag that set 0.001 s."""
    import argparse

    from distbelief.errors import ChildFailedError
    from distbelief.launch.cli_errors import child_failed

    args = argparse.Namespace(command="train", verbose=False)
    timed_out = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "distbelief.errors.ShardTimeoutError: shard 0 (tcp://127.0.0.1:1): hello timed out "
        "after 0.001s: the peer took the connection but answered nothing\n"
    )
    assert child_failed(args, ChildFailedError("worker0", 1, timed_out)) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "distbelief train: a request waits --timeout seconds for its answer"
    # Connecting has its own limit (5 s at most), and a refusal is no timeout.
    connecting = timed_out.replace("after 0.001s:", "after 5s connecting:")
    refused = timed_out.replace("ShardTimeoutError", "ShardUnavailableError")
    for other in (connecting, refused):
        assert child_failed(args, ChildFailedError("worker0", 1, other)) == 1
        assert "--timeout" not in capsys.readouterr().err
    verbose = argparse.Namespace(command="train", verbose=True)
    assert child_failed(verbose, ChildFailedError("worker0", 1, timed_out)) == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith("--timeout seconds for its answer")


def test_a_model_the_shards_refuse_names_tables_where_they_were_given(capsys):
    """``eval --tables`` of other tables than the job's was told to give the job's --model."""
    import argparse

    from distbelief.errors import ModelMismatchError
    from distbelief.launch.cli_errors import run_reporting_failures

    def refused() -> int:
        raise ModelMismatchError("tensor 'tables.2.weight' [1000, 16] float32 does not match")

    args = argparse.Namespace(command="eval", verbose=False, **{"embeddings.tables": ("t",)})
    assert run_reporting_failures(args, refused) == 2
    assert capsys.readouterr().err.endswith("(give the job's --model, --tables and its flags)\n")
