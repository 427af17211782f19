"""Processes started in ``in_a_process_group_of_their_own`` miss a signal to the starting
process's group (what ``timeout`` sends), and the starting process keeps its group."""

import os
import signal
import subprocess
import sys

import pytest

_STARTER = """
import os, subprocess, sys, time
from distbelief.launch.process_groups import in_a_process_group_of_their_own
before = os.getpgrp()
with in_a_process_group_of_their_own():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(before, os.getpgrp(), child.pid, os.getpgid(child.pid), flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")
@pytest.mark.parametrize("leader", [True, False], ids=["group-leader", "group-member"])
def test_a_signal_to_the_starters_group_misses_what_it_started(leader):
    python = [sys.executable, "-c", _STARTER]
    # As a shell's job (the starter leads its group), or in a group a shell leads.
    command = python if leader else ["sh", "-c", '"$0" -c "$1"; :', *python[0:1], _STARTER]
    group = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        # A new group; the shell's in a new session too (a session leader may not change its
        # group: the starter never is one here).
        process_group=0 if leader else None,
        start_new_session=not leader,
    )
    child_pid = None
    try:
        group_before, group_after, child_pid, child_group = map(
            int, group.stdout.readline().split()
        )
        assert group_after == group_before == group.pid
        assert child_group != group_before
        os.killpg(group.pid, signal.SIGTERM)
        assert group.wait(timeout=30) == -signal.SIGTERM
        os.kill(child_pid, 0)  # alive: the signal missed it
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
            group.wait(timeout=30)
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)
