"""``distbelief`` commands run as processes forked from one forkserver that has torch loaded,
for the shards the tests start by hand.

Each is a real process of its own, the command line's ``main`` running in it with its own
environment and its stdout on a pipe, as ``python -m distbelief ps ...`` runs; only the import
of torch is shared. A separately started interpreter spends 2-3 s of CPU importing torch: with
a hundred shards per suite on two cores, that was a fifth of the suite's time. Has no pytest
imports: the forkserver loads this module.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.forkserver
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import IO

PRELOAD = ["torch", "distbelief.launch.cli", "distbelief.server.process", __name__]
"""What the forkserver imports once: what ``distbelief ps`` needs before it serves."""


_STDERR_FOLDER: list[str] = []
"""The folder of the started commands' stderr files, once made (removed by
``remove_stderr_files``)."""


def _run_command(
    argv: list[str], env: dict[str, str], stdout: Connection, stderr_path: str
) -> None:
    """The child: ``distbelief ARGV`` with ``env``, its stdout on ``stdout``, its stderr in
    ``stderr_path``."""
    os.dup2(stdout.fileno(), 1)
    stdout.close()
    _run_main(argv, env, stderr_path)


def _run_command_to_files(
    argv: list[str], env: dict[str, str], stdout_path: str, stderr_path: str
) -> None:
    """The child: ``distbelief ARGV`` with ``env``, its stdout and stderr in those files."""
    stdout = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(stdout, 1)
    os.close(stdout)
    _run_main(argv, env, stderr_path)


def _run_main(argv: list[str], env: dict[str, str], stderr_path: str) -> None:
    """``distbelief ARGV`` in this child, with ``env``, its stderr to ``stderr_path``."""
    os.environ.clear()
    os.environ.update(env)
    stderr = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(stderr, 2)
    os.close(stderr)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["distbelief", *argv]
    from distbelief.launch.cli import main

    sys.exit(main(argv))


class ForkedCommand:
    """A forked command, with what the tests use of ``subprocess.Popen``."""

    def __init__(
        self,
        process: mp.process.BaseProcess,
        stdout: IO[str],
        argv: list[str],
        stderr_path: str | None = None,
    ) -> None:
        self._process = process
        self.pid = process.pid
        self.stdout = stdout
        self.args = argv
        self.stderr_path = stderr_path
        self.returncode: int | None = None

    def stderr_tail(self, lines: int = 5) -> str:
        """The last ``lines`` lines the command wrote to its stderr (what it said when it
        refused to start, say); empty where nothing was kept."""
        if self.stderr_path is None:
            return ""
        try:
            with open(self.stderr_path, errors="replace") as stderr:
                return "".join(stderr.readlines()[-lines:])
        except OSError:
            return ""

    def _running(self) -> bool:
        # The forkserver reports an exit code (255) for children it can no longer report on,
        # if it went away first: the process itself decides.
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def poll(self) -> int | None:
        if self.returncode is None:
            code = self._process.exitcode
            if code is not None and not self._running():
                self.returncode = code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            if self._process.exitcode is None:
                self._process.join(left)
            else:  # reported gone by a forkserver that went first, but still running
                time.sleep(0.05 if left is None else min(0.05, left))
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _context() -> mp.context.BaseContext:
    """The forkserver's context, its preload set before it starts."""
    context = mp.get_context("forkserver")
    if getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None) is None:
        context.set_forkserver_preload(PRELOAD)
    return context


def start_command(argv: Sequence[str], env: Mapping[str, str]) -> ForkedCommand:
    """``distbelief ARGV`` forked, its stdout readable as text lines."""
    context = _context()
    if not _STDERR_FOLDER:
        _STDERR_FOLDER.append(tempfile.mkdtemp(prefix="distbelief-stderr-"))
    fd, stderr_path = tempfile.mkstemp(dir=_STDERR_FOLDER[0], suffix=".err")
    os.close(fd)
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(
        target=_run_command, args=(list(argv), dict(env), writer, stderr_path), name="distbelief"
    )
    process.start()
    writer.close()
    stdout = open(os.dup(reader.fileno()), encoding="utf-8")  # noqa: SIM115 (closed by the caller)
    reader.close()
    return ForkedCommand(process, stdout, list(argv), stderr_path)


def remove_stderr_files() -> None:
    """Removes the stderr files of the commands ``start_command`` started."""
    while _STDERR_FOLDER:
        shutil.rmtree(_STDERR_FOLDER.pop(), ignore_errors=True)


def run_command(
    argv: Sequence[str], env: Mapping[str, str], timeout_s: float
) -> subprocess.CompletedProcess:
    """``distbelief ARGV`` forked and run to its end, its exit code, stdout and stderr as
    ``subprocess.run`` gives them; killed if still running after ``timeout_s``.

    Raises:
        subprocess.TimeoutExpired: the command ran past ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="distbelief-command-") as folder:
        stdout_path, stderr_path = os.path.join(folder, "out"), os.path.join(folder, "err")
        process = _context().Process(
            target=_run_command_to_files,
            args=(list(argv), dict(env), stdout_path, stderr_path),
            name="distbelief",
        )
        process.start()
        command = ForkedCommand(process, open(os.devnull), list(argv))  # noqa: SIM115
        try:
            returncode = command.wait(timeout_s)
        finally:
            command.stdout.close()
            if command.poll() is None:
                command.kill()
                command.wait(30)
        with open(stdout_path) as stdout, open(stderr_path) as stderr:
            return subprocess.CompletedProcess(list(argv), returncode, stdout.read(), stderr.read())
