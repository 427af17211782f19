"""The process's file-descriptor limit: a server that may hold thousands of connections raises
its soft limit (RLIMIT_NOFILE) toward the hard limit, as far as it needs and the OS allows, and
says so when that is not enough. Touches no socket.
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger(__name__)

FD_HEADROOM = 128
"""Descriptors a server process needs besides its connections: the listener, the poller,
checkpoint files, pipes to its launcher, the Python runtime's own."""


def fd_limit() -> int | None:
    """The soft limit on open file descriptors (None: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_fd_limit(wanted: int) -> int | None:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` if it is lower, up to the hard limit; logs a
    warning naming both numbers when the OS does not allow ``wanted``.

    Returns:
        The soft limit now (None: unlimited).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return fd_limit()
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:  # macOS caps the soft limit below an infinite hard one
        logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    now = fd_limit()
    if now is not None and now < wanted:
        logger.warning(
            "open-file limit %d (hard limit %s) is below the %d this server may need: "
            "raise the hard limit (ulimit -Hn) or lower the connection cap",
            now,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            wanted,
        )
    elif now != soft:
        logger.info("raised the open-file limit from %d to %s", soft, now)
    return now
