"""Processes started in ``in_a_process_group_of_their_own`` miss a signal to the starting
process's group (what ``timeout`` sends), and the starting process keeps its group."""

import contextlib
import os
import signal
import subprocess
import sys
import time

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
    group = _start_in_a_group(_STARTER, leader)
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


_STARTER_STAYING_INSIDE = """
import os, subprocess, sys, time
from distbelief.launch.process_groups import in_a_process_group_of_their_own
with in_a_process_group_of_their_own():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(os.getpid(), child.pid, flush=True)
    time.sleep(60)  # as Ray's start: the signal comes while the starter is away from its group
"""


def _gone_within(pid: int, timeout_s: float) -> bool:
    """Whether ``pid`` has exited (or is a zombie) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="POSIX process groups, /proc")
@pytest.mark.parametrize("leader", [True, False], ids=["group-leader", "group-member"])
def test_a_signal_to_the_starters_group_inside_the_block_reaches_the_starter(leader):
    # Ctrl-C at a terminal, or SIGTERM to the job's group, while the block runs (seconds, for
    # the embedded Ray's start): the starter gets it, and what it started does not.
    group = _start_in_a_group(_STARTER_STAYING_INSIDE, leader)
    starter_pid, child_pid = map(int, group.stdout.readline().split())
    try:
        os.killpg(group.pid, signal.SIGTERM)
        if leader:
            assert group.wait(timeout=30) == -signal.SIGTERM
        else:
            group.wait(timeout=30)  # the shell, which dies of it
            assert _gone_within(starter_pid, 30)
        os.kill(child_pid, 0)  # alive: the signal missed it
    finally:
        for pid in (starter_pid, child_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        group.wait(timeout=30)


def _start_in_a_group(script: str, leader: bool) -> subprocess.Popen:
    """``script`` run as a shell's job (leading its own process group), or in a group a shell
    leads."""
    command = (
        [sys.executable, "-c", script]
        if leader
        else ["sh", "-c", '"$0" -c "$1"; :', sys.executable, script]
    )
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        # A new group; the shell's in a new session too (a session leader may not change its
        # group: the starter never is one here).
        process_group=0 if leader else None,
        start_new_session=not leader,
    )
