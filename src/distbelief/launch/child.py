"""What every process started by the local cluster does around its role: signals, launcher
watch, reporting events, its result or its traceback to the launcher; and the launcher's inbox.

Each child writes to a pipe of its own. A shared ``multiprocessing.Queue`` is not used: its
write lock, held by a child killed with SIGKILL mid-write, would block every other child.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from typing import Any


def _watch_launcher(lifeline: Connection) -> None:
    # A launcher killed with SIGKILL cannot clean up; its children notice and leave by themselves.
    # Only the launcher holds the other end of the lifeline, so EOF means the launcher is gone,
    # whoever the child's parent is (a forkserver) and however late the child started.
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv()
    os._exit(3)


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


class ChannelEmitter:
    """A child's ``emit(kind, payload)``: sends ``(kind, name, payload)`` up its pipe."""

    def __init__(self, connection: Connection, name: str) -> None:
        self._connection = connection
        self._name = name
        self._lock = threading.Lock()

    def __call__(self, kind: str, payload: object) -> None:
        with self._lock:  # Connection.send is not safe from several threads at once
            self._connection.send((kind, self._name, payload))


class EventInbox:
    """The launcher's end of every child's pipe.

    Args:
        on_closed: called with a pipe that closed (its child is gone); what it returns, if not
            None, is the pipe's last event (after every event the pipe held).
    """

    def __init__(self, on_closed: Callable[[Connection], tuple | None] | None = None) -> None:
        self._readers: list[Connection] = []
        self._pending: collections.deque[tuple] = collections.deque()
        self._on_closed = on_closed

    def add(self, reader: Connection) -> None:
        self._readers.append(reader)

    def get(self, timeout_s: float) -> tuple | None:
        """The next event, waiting up to ``timeout_s``; None if there is none."""
        if not self._pending and self._readers:
            for reader in mp_connection.wait(self._readers, timeout=max(0.0, timeout_s)):
                self._drain(reader)
        elif not self._pending:
            time.sleep(max(0.0, timeout_s))
        return self._pending.popleft() if self._pending else None

    def _drain(self, reader: Connection) -> None:
        try:
            while reader.poll():
                self._pending.append(reader.recv())
        except (EOFError, OSError, pickle.UnpicklingError):
            # The child is gone (a message cut short by SIGKILL reads as garbage or EOF).
            self._readers.remove(reader)
            reader.close()
            last = None if self._on_closed is None else self._on_closed(reader)
            if last is not None:
                self._pending.append(last)


def run_child(
    name: str, connection: Connection, lifeline: Connection, target: Callable[..., Any], *args: Any
) -> None:
    """Entry point of a launcher child: runs ``target(emit, *args)`` and reports how it ended;
    exits at once when ``lifeline`` (whose other end only the launcher holds) reads EOF.

    Ctrl-C is left to the launcher (which stops every child in order); SIGTERM ends the child
    through SystemExit so its ``finally`` blocks run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    threading.Thread(target=_watch_launcher, args=(lifeline,), daemon=True).start()
    emit = ChannelEmitter(connection, name)
    try:
        result = target(emit, *args)
    except SystemExit:
        raise
    except BaseException:
        emit("error", traceback.format_exc())
        raise SystemExit(1) from None
    emit("done", result)


class SharedStopFlag:
    """A stop flag shared with child processes that survives a child killed mid-wait.

    ``multiprocessing.Event`` is not safe here: its ``set()`` blocks until every waiter has
    woken, and a waiter killed with SIGKILL never does, so the launcher would hang. This flag
    is one byte of shared memory, polled.
    """

    _POLL_S = 0.05

    def __init__(self, ctx: Any) -> None:
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(
                self._POLL_S
                if deadline is None
                else min(self._POLL_S, max(0.0, deadline - time.monotonic()))
            )
        return True
