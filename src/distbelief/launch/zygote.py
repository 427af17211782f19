"""A node's zygote for one Ray job: a process that loads torch and the roles once, then forks
each of the job's processes on its node when that process's actor asks, as the local launcher's
forkserver does. Its children start at once and share the loaded modules' memory: separately
started interpreters, each with its own copy, used about a tenth more CPU per step on a busy
node (benchmarks/ray_launcher.py). Owns both ends of its small protocol.

The protocol, on a Unix socket in the abstract namespace (node-local; only a process of the
same user is served, checked by the peer's credentials): the actor sends the length of its job
(the launcher's pickled bytes, which the zygote never unpickles) with the reading end of the
actor's lifeline pipe attached, then the job; the zygote forks, answers the child's pid, and,
when the child exits, its exit code. The child ends at once when its lifeline reads EOF (its
actor was killed). The zygote ends when its own stdin (held by the job's node host actor) does;
children running then live on, each until its own end.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)

LENGTH = struct.Struct("!Q")
PID = struct.Struct("!q")
EXIT_CODE = struct.Struct("!q")
CONNECT_TIMEOUT_S = 60.0
"""Longest an actor waits for its node's zygote to answer (it may still be loading torch)."""
BIND_TIMEOUT_S = 10.0
"""Longest a zygote waits for its name to be free (an earlier one of the node may be ending)."""
REQUEST_TIMEOUT_S = 10.0
"""Longest the zygote waits for one actor's request once it is connected."""
POLL_S = 1.0
"""How often a waiting actor wakes (its waits are bounded; a role may run for days)."""
MAX_JOB_BYTES = 64 << 20
EXIT_LOST = -1
"""The exit code reported when the zygote went away before its child did."""
_JOIN_THREADS_S = 5.0


class ZygoteUnavailable(Exception):
    """The node's zygote cannot fork (gone, not started, or refused): start a plain process."""


def abstract_address(name: str) -> str:
    """The abstract-namespace address (Linux) of the zygote called ``name``."""
    return "\0distbelief-" + name


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise ConnectionError("peer closed")
        chunks += chunk
    return bytes(chunks)


# ---------------------------------------------------------------- the actor's end


class ForkedChild:
    """A process the zygote forked for this actor: its pid, and a wait for its exit code."""

    def __init__(self, sock: socket.socket, pid: int, lifeline: int) -> None:
        self._sock = sock
        self.pid = pid
        self._lifeline = lifeline

    def wait(self) -> int:
        """Blocks until the child exits; its exit code (negative: killed by that signal), or
        EXIT_LOST if the zygote went away first (then once the child has gone too)."""
        self._sock.settimeout(POLL_S)
        try:
            while True:
                try:
                    return EXIT_CODE.unpack(_recv_exact(self._sock, EXIT_CODE.size))[0]
                except TimeoutError:
                    continue
        except (ConnectionError, OSError):
            self._wait_gone()
            return EXIT_LOST
        finally:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.close(self._lifeline)

    def _wait_gone(self) -> None:
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:  # gone already
            return
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(fd, selectors.EVENT_READ)
                while not selector.select(POLL_S):
                    pass
        finally:
            os.close(fd)


def fork_child(address: str, job: bytes) -> ForkedChild:
    """Asks the zygote at ``address`` to fork a process that runs ``job``.

    Raises:
        ZygoteUnavailable: no zygote there within CONNECT_TIMEOUT_S, or it failed mid-request.
    """
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(address)
            break
        except (ConnectionRefusedError, FileNotFoundError) as e:
            # Its node host is still starting it.
            if time.monotonic() > deadline:
                sock.close()
                raise ZygoteUnavailable(f"no zygote: {e}") from e
            time.sleep(0.1)
        except OSError as e:
            sock.close()
            raise ZygoteUnavailable(str(e)) from e
    reader, writer = os.pipe()
    try:
        # Connected, it may still be loading torch: the answer comes once it accepts.
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        socket.send_fds(sock, [LENGTH.pack(len(job))], [reader])
        sock.sendall(job)
        pid = PID.unpack(_recv_exact(sock, PID.size))[0]
    except (OSError, ConnectionError) as e:
        sock.close()
        os.close(writer)
        raise ZygoteUnavailable(f"the zygote failed: {e}") from e
    finally:
        os.close(reader)  # the child holds it now; EOF there when ``writer`` closes
    return ForkedChild(sock, pid, writer)


# ---------------------------------------------------------------- the zygote's end


def _same_user(sock: socket.socket) -> bool:
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid == os.getuid()


class Zygote:
    """The serving loop: one thread, so that every fork is of a single-threaded process."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._children: dict[int, socket.socket] = {}

    def serve(self, preload: Sequence[str]) -> None:
        """Loads ``preload``, then forks on request until stdin reads EOF."""
        for module in preload:
            __import__(module)
        signal.set_wakeup_fd(self._wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the fd
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ, "accept")
            selector.register(self._wake_r, selectors.EVENT_READ, "reap")
            selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "host")
            while True:
                for key, _ in selector.select(POLL_S):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "host":
                        if not os.read(sys.stdin.fileno(), 4096):
                            return  # the node host is gone: the job is over
                    else:
                        with contextlib.suppress(BlockingIOError):
                            while self._wake_r.recv(4096):
                                pass
                self._reap()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            if not _same_user(sock):
                raise PermissionError("a process of another user")
            sock.settimeout(REQUEST_TIMEOUT_S)
            header, fds, _flags, _address = socket.recv_fds(sock, LENGTH.size, 1)
            if len(header) != LENGTH.size or len(fds) != 1:
                raise ConnectionError("a malformed request")
            (length,) = LENGTH.unpack(header)
            if length > MAX_JOB_BYTES:
                raise ConnectionError(f"a job of {length} bytes")
            job = _recv_exact(sock, length)
        except (OSError, ConnectionError) as e:
            logger.warning("zygote: request refused: %s", e)
            for fd in fds:  # a refused request's lifeline is not kept (nor handed to children)
                os.close(fd)
            sock.close()
            return
        self._fork(sock, fds[0], job)

    def _fork(self, sock: socket.socket, lifeline: int, job: bytes) -> None:
        pid = os.fork()
        if pid == 0:
            self._become_child(sock, lifeline, job)
        os.close(lifeline)
        self._children[pid] = sock
        with contextlib.suppress(OSError):
            sock.sendall(PID.pack(pid))

    def _become_child(self, sock: socket.socket, lifeline: int, job: bytes) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for own in (self._listener, self._wake_r, self._wake_w, sock, *self._children.values()):
                own.close()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, sys.stdin.fileno())  # the zygote's stdin is its node host's
            os.close(devnull)
            from distbelief.launch.ray_child import run_job

            code = run_job(job, lifeline)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            logger.exception("zygote child")
        finally:
            _leave(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            sock = self._children.pop(pid, None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(REQUEST_TIMEOUT_S)
                    sock.sendall(EXIT_CODE.pack(os.waitstatus_to_exitcode(status)))
                sock.close()


def _leave(code: int) -> None:
    """Ends a forked child as a multiprocessing child ends: its other threads joined (bounded),
    its streams flushed, no return into the zygote's loop."""
    try:
        deadline = time.monotonic() + _JOIN_THREADS_S
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join(max(0.0, deadline - time.monotonic()))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    finally:
        os._exit(code)


def main() -> int:
    """``python -m distbelief.launch.zygote NAME [MODULE ...]``: binds first (actors that
    connect early wait in the backlog), then loads the modules (by default torch and the
    roles), then serves."""
    from distbelief.launch.entry import PRELOADED_MODULES

    logging.basicConfig(level=logging.WARNING, format="[zygote] %(levelname)s %(message)s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + BIND_TIMEOUT_S
    while True:
        try:
            listener.bind(abstract_address(sys.argv[1]))
            break
        except OSError as e:
            # A zygote of the same name still leaving (its node host was re-created).
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    listener.listen(128)
    Zygote(listener).serve(sys.argv[2:] or PRELOADED_MODULES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
