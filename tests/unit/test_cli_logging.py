"""The command's log lines: its own INFO lines, and a library's only from WARNING up. Torch
logs its FakeTensor cache statistics at INFO when the interpreter exits; a Ctrl-C that stopped
torch's import before it set its own loggers' levels printed them after the one line that says
the command was interrupted."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import CHILD_ENV

# A command that ends at once (exit 2), then what a library (with no level of its own, as
# torch's loggers are before its import has set theirs) and the command log as it exits.
_LOG_AFTER_A_COMMAND = """
import logging, sys
from distbelief.launch.cli import main
code = main(["reshard", sys.argv[1], "--shards", "2"])
logging.getLogger("a_library.cache").info("cache stats:")
logging.getLogger("a_library.cache").warning("a library's warning")
logging.getLogger("distbelief.launch.job").info("the command's own line")
sys.exit(code)
"""


def test_a_library_logs_nothing_below_warning_beside_the_commands_own_lines(tmp_path):
    command = [sys.executable, "-c", _LOG_AFTER_A_COMMAND, str(tmp_path / "nowhere")]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=60, env=CHILD_ENV)
    assert ran.returncode == 2, ran.stderr
    assert "cache stats" not in ran.stderr
    assert "a_library.cache WARNING a library's warning" in ran.stderr
    assert "distbelief.launch.job INFO the command's own line" in ran.stderr
