"""Stretches of a process's main thread where SIGINT, SIGTERM and SIGHUP are only noted, then
acted on (raised again for the handlers in place before) at the end: code there cannot be cut
off half-way. A handler's exception lands wherever the interpreter is: inside a C extension's
initialisation it can crash the interpreter; in an after-fork hook it is printed and lost; in
the middle of Ray's start it leaves Ray's processes running with no one to stop them; in a
shard's last checkpoint it loses what the shard applied since its periodic one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def signals_deferred(*, raise_noted: bool = True) -> Iterator[list[int]]:
    """SIGINT, SIGTERM and SIGHUP only noted inside the block; at its end (an exception or not) the
    handlers in place before are put back and the first signal noted is raised again for
    them. ``raise_noted=False``: it is dropped instead, for a block that finishes what it was
    asked to do (a stop during it comes too late: what it would stop is done); the list the
    block is given holds the signals noted, once it has ended. Outside the main thread (which
    alone runs signal handlers) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    noted: list[int] = []
    # A handler installed outside Python (getsignal: None) could not be put back: left alone.
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    wanted = [s for s in stopping if signal.getsignal(s) is not None]
    previous = {signum: signal.signal(signum, lambda n, _f: noted.append(n)) for signum in wanted}
    try:
        yield noted
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if noted and raise_noted:
            signal.raise_signal(noted[0])
