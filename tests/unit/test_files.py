"""Files written atomically (a temporary file, then a rename): readers see the old file or the
new one, and the new one has the permissions a file written in place would have."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from distbelief.files import write_file_atomic, write_files_atomic, write_text_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Sets the process's umask for one test, and puts the old one back."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_new_file_gets_the_umasks_permissions_not_a_temporary_files(
    tmp_path, umask, mask, expected
):
    umask(mask)
    path = tmp_path / "metrics.csv"
    write_text_atomic(path, "time_s,role\n")
    assert _mode(path) == expected
    assert path.read_text() == "time_s,role\n"


def test_a_checkpoints_tensor_file_gets_the_umasks_permissions(tmp_path, umask):
    """safetensors renames a private temporary file of its own onto the one it is given: a
    checkpoint's tensor file was 0600 beside its JSON's 0644."""
    import torch

    from distbelief.server.checkpoint import write_tensor_file

    umask(0o022)
    path = tmp_path / "shard0-v000000000001.safetensors"
    write_tensor_file(path, {"w": torch.zeros(2)})
    assert _mode(path) == 0o644


def test_a_rewritten_file_keeps_its_permissions(tmp_path, umask):
    path = tmp_path / "summary.json"
    path.write_text("{}")
    path.chmod(0o640)  # as the user set it
    write_text_atomic(path, '{"outcome": "done"}')
    assert _mode(path) == 0o640
    assert path.read_text() == '{"outcome": "done"}'


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"config\.json"):
        write_file_atomic(path, fails)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_link_that_leads_nowhere_is_named_as_one(tmp_path):
    """A dangling link or a loop given as a folder was refused as `cannot create the folder:
    File exists`, which it does not."""
    from distbelief.files import make_folder

    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for name in ("dangling", "loop"):
        with pytest.raises(ValueError) as refused:
            make_folder(tmp_path / name / "run", "--out")
        assert str(refused.value) == (
            f"--out {tmp_path / name / 'run'}: {tmp_path / name} is a link that leads nowhere "
            "(its target is missing, or it is a loop)"
        )


def test_files_written_together_are_all_written_or_none(tmp_path):
    """The second cannot be written: the first keeps its old text, and no temporary file is
    left of either."""
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("old")

    def no_room(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as raised:
        write_files_atomic({first: lambda tmp: tmp.write_text("new"), second: no_room})
    assert raised.value.filename == str(second)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.txt"]
    assert first.read_text() == "old"
    write_files_atomic({first: lambda tmp: tmp.write_text("new"), second: lambda tmp: None})
    assert first.read_text() == "new" and second.read_text() == ""
