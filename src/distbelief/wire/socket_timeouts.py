"""Bounding every blocking call on a connected socket, at the lowest cost per call.

Python's own socket timeouts put the descriptor in non-blocking mode and poll() before every
send and receive, and changing them is a syscall too: on a small request that is a third of the
syscalls. A plain TCP socket here instead stays blocking and the kernel bounds each call
(SO_RCVTIMEO / SO_SNDTIMEO): set once per connection, no poll per call, and a whole tensor can
be received in one call. A call that times out raises ``BlockingIOError``; the framing code turns
it into ``TimeoutError``. TLS sockets (whose retry loop would spin on a kernel timeout) and
platforms without a ``struct timeval`` option keep Python's timeouts.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys

_TIMEVAL = struct.Struct("@ll")
_KERNEL_TIMEOUTS = sys.platform.startswith(("linux", "darwin", "freebsd"))
MIN_TIMEOUT_S = 0.001
"""A zero kernel timeout means "wait forever": the shortest bound ever set is this."""


def uses_kernel_timeouts(sock: socket.socket) -> bool:
    """Whether ``sock``'s calls are bounded by the kernel (blocking descriptor)."""
    return _KERNEL_TIMEOUTS and not isinstance(sock, ssl.SSLSocket)


def limit_each_call(sock: socket.socket, timeout_s: float) -> None:
    """Make every later send or receive on ``sock`` give up after ``timeout_s`` seconds.

    Raises:
        ValueError: ``timeout_s`` is not positive.
        OSError: the socket is closed.
    """
    if not timeout_s > 0:
        raise ValueError(f"socket timeout must be > 0, got {timeout_s}")
    timeout_s = max(timeout_s, MIN_TIMEOUT_S)
    if not uses_kernel_timeouts(sock):
        sock.settimeout(timeout_s)
        return
    seconds = int(timeout_s)
    value = _TIMEVAL.pack(seconds, int((timeout_s - seconds) * 1_000_000))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
