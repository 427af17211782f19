"""Starting long-lived helpers (the embedded Ray instance's own processes) outside the
launcher's process group.

A signal to the launcher's whole group (``timeout`` sends its SIGTERM that way, as does
``kill -TERM -PGID``) then reaches the launcher, which stops the job in order and shuts the
helpers down itself; it no longer kills them first, which left the launcher waiting on a Ray
that was gone. Ctrl-C needs none of this: Ray's processes block SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_HOLDER_EXIT_TIMEOUT_S = 10.0


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
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            process_group=0,  # the holder leads a new group, which this process then joins
        )
    except OSError as e:
        logger.debug("cannot start a process group's holder: %s", e)
        yield
        return
    try:
        os.setpgid(0, holder.pid)
    except OSError as e:
        logger.debug("cannot join a new process group: %s", e)
        _release(holder)
        yield
        return
    try:
        yield
    finally:
        _return_to(own_group)
        _release(holder)


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
    """End the holder (EOF on its stdin); the group lives on with the processes in it."""
    assert holder.stdin is not None
    holder.stdin.close()
    try:
        holder.wait(timeout=_HOLDER_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait(timeout=_HOLDER_EXIT_TIMEOUT_S)
