"""A virtual environment at .venv is ignored whether it is a folder or a link to one: a linked
.venv that ``git add -A`` took into a commit replaced the folder of every checkout the commit
reached with a link (git removes ignored files in its way)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout"
)
def test_a_venv_link_is_ignored():
    # --no-index: whether the rules ignore the path, tracked or not; a missing path is a file.
    result = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--no-index", "-q", ".venv"], timeout=60
    )
    assert result.returncode == 0
