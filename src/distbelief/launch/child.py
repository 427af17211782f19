"""What every process started by the launcher does around its role: signals, parent watch,
and reporting its result or its traceback to the launcher's event queue."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

_PARENT_POLL_S = 0.5


def _watch_parent(parent_pid: int) -> None:
    # A launcher killed with SIGKILL cannot clean up; its children notice and leave by themselves.
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(3)


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_child(name: str, events: Any, target: Callable[..., Any], *args: Any) -> None:
    """Entry point of a launcher child: runs ``target(*args)`` and reports how it ended.

    Ctrl-C is left to the launcher (which stops every child in order); SIGTERM ends the child
    through SystemExit so its ``finally`` blocks run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        result = target(*args)
    except SystemExit:
        raise
    except BaseException:
        events.put(("error", name, traceback.format_exc()))
        raise SystemExit(1) from None
    events.put(("done", name, result))
