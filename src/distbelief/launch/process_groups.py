"""Starting long-lived helpers (the embedded Ray instance's own processes) outside the
launcher's process group.

A signal to the launcher's whole group (``timeout`` sends its SIGTERM that way, as does
``kill -TERM -PGID``) then reaches the launcher, which stops the job in order and shuts the
helpers down itself; it no longer kills them first, which left the launcher waiting on a Ray
that was gone. Ctrl-C needs none of this: Ray's processes block SIGINT.

While the helpers start (seconds, for Ray) the launcher itself is away from its group: a
stand-in stays there and passes on what the group is sent (Ctrl-C at a terminal, SIGTERM to the
group, SIGHUP) to the launcher, which would otherwise miss it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_HOLDER_EXIT_TIMEOUT_S = 10.0
_STAND_IN_READY_TIMEOUT_S = 30.0
"""Longest wait for the stand-in's interpreter to start (tens of ms on an idle machine)."""

_STAND_IN = """
import os, signal, sys
launcher = int(sys.argv[1])
def pass_on(signum, _frame):
    # Back in the group (the block's end), the launcher got the signal itself: no second one.
    try:
        if os.getpgid(launcher) != os.getpgrp():
            os.kill(launcher, signum)
    except ProcessLookupError:
        sys.exit(0)  # the launcher is gone: nothing to pass on to
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, pass_on)
print("ready", flush=True)
sys.stdin.read()
"""
"""Stays in the launcher's group while the launcher is away, passing on its stopping signals."""


@contextlib.contextmanager
def in_a_process_group_of_their_own() -> Iterator[None]:
    """Processes started inside the block go into a new process group, not this process's.

    This process joins a new group for the block (one that a short-lived holder process
    creates) and returns to its own group at the end. Where that cannot be done (not POSIX,
    not the main thread, a session leader, which may not change its group), the block runs
    in this process's group as before.
    """
    if (
        not hasattr(os, "setpgid")
        or threading.current_thread() is not threading.main_thread()
        or os.getsid(0) == os.getpid()
    ):
        yield
        return
    own_group = os.getpgrp()
    stand_in = _start_stand_in()
    if stand_in is None:
        yield
        return
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            process_group=0,  # the holder leads a new group, which this process then joins
        )
    except OSError as e:
        logger.debug("cannot start a process group's holder: %s", e)
        _release(stand_in)
        yield
        return
    try:
        os.setpgid(0, holder.pid)
    except OSError as e:
        logger.debug("cannot join a new process group: %s", e)
        _release(holder)
        _release(stand_in)
        yield
        return
    try:
        yield
    finally:
        _return_to(own_group)
        _release(holder)
        _release(stand_in)


def _start_stand_in() -> subprocess.Popen | None:
    """The stand-in, in this process's group, once it passes signals on; None (logged) where
    it cannot start or does not report ready in time."""
    try:
        stand_in = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _STAND_IN, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
    except OSError as e:
        logger.debug("cannot start a process group's stand-in: %s", e)
        return None
    assert stand_in.stdout is not None
    # Until its handlers are in place a signal would end it, and the launcher would miss it.
    readable, _, _ = select.select([stand_in.stdout], [], [], _STAND_IN_READY_TIMEOUT_S)
    if readable and stand_in.stdout.readline() == b"ready\n":
        return stand_in
    logger.debug("a process group's stand-in did not start within %.0fs", _STAND_IN_READY_TIMEOUT_S)
    _release(stand_in)
    return None


def _return_to(group: int) -> None:
    """Back to ``group``: when this process led it alone, setpgid recreates it under the same
    id (this process's). A group that is gone meanwhile (its other members all exited) cannot
    be rejoined: this process then leads a group of its own, where signals to it still reach
    it and not the processes started in the block."""
    try:
        os.setpgid(0, group)
    except OSError as e:
        logger.warning(
            "cannot return to process group %d (%s): leading a group of its own", group, e
        )
        os.setpgid(0, 0)


def _release(holder: subprocess.Popen) -> None:
    """End the holder or the stand-in (EOF on its stdin); the group lives on with the processes
    in it."""
    assert holder.stdin is not None
    holder.stdin.close()
    if holder.stdout is not None:
        holder.stdout.close()
    try:
        holder.wait(timeout=_HOLDER_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait(timeout=_HOLDER_EXIT_TIMEOUT_S)
