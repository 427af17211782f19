"""Shared fixtures: real shard processes on 127.0.0.1, always cleaned up."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from distbelief.launch.cli import main as distbelief_main
from distbelief.launch.local import stop_forkserver
from tests.forked import ForkedCommand, remove_stderr_files, run_command, start_command

if TYPE_CHECKING:
    from distbelief.server import ParameterShard
    from distbelief.worker import StepInfo

# One torch thread per process unless a test asks for more: the suite runs four test processes
# on two cores, each starting more; torch's default (a thread per core in every process) had
# their threads wait on each other's cores, and a three-process run took 5x the CPU.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A shell without job control starts background commands with SIGINT ignored, and an ignored
# signal stays ignored in every process started after: the tests that stop a process with Ctrl-C
# (and those of the launcher's own handling of it) need it delivered. A handler, unlike "ignored",
# is reset to the default in the processes the tests start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

CLI = [sys.executable, "-m", "distbelief"]
CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
_ADDRESS_LINE = re.compile(r"serving shard (\d+) at (tcp://\S+)")
_START_TIMEOUT_S = 60.0


def _spawn_shard(
    shard_id: int, num_shards: int, *extra: str, forked: bool = True
) -> ForkedCommand | subprocess.Popen:
    """``distbelief ps``: forked with torch loaded (tests/forked.py says why), or, with
    ``forked=False``, started as users start it (``python -m distbelief ps``)."""
    argv = [
        "ps",
        "--shard-id",
        str(shard_id),
        "--num-shards",
        str(num_shards),
        "--bind",
        "tcp://127.0.0.1:0",
        *(extra if "--auth-key-file" in extra else ("--no-auth", *extra)),
    ]
    if forked:
        return start_command(argv, CHILD_ENV)
    return subprocess.Popen(
        [*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=CHILD_ENV
    )


@pytest.fixture(scope="session", autouse=True)
def _forked_commands() -> Iterator[None]:
    """Stops the forkserver of the shards started by hand after the last test."""
    yield
    stop_forkserver()
    remove_stderr_files()


def run_cli(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """``distbelief ARGS`` run to the end (at most ``timeout_s``), its output captured."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout_s, env=CHILD_ENV
    )


def run_forked(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """``distbelief ARGS`` as ``run_cli`` runs it, but forked with torch loaded (tests/forked.py
    says why): for a command that starts no process of its own (``worker``, ``eval``, ``ps``)."""
    return run_command(args, CHILD_ENV, timeout_s)


def run_main(*args: str, capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """``distbelief ARGS`` run by its ``main`` in this process, its exit code and output as
    ``run_cli`` gives them: for a command refused before it starts anything, which a process
    of its own spent most of its time on importing torch. Its log lines go to its stderr as
    the command's own logging setup puts them (pytest's handlers on the root logger would
    make that setup do nothing)."""
    capsys.readouterr()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        code = distbelief_main(list(args))
    except SystemExit as exited:  # a flag argparse refuses
        code = exited.code
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([*CLI, *args], code, out, err)


def start_scripts(commands: list[list[str]]) -> list[subprocess.Popen]:
    """``python COMMAND`` for each command, started at once, output captured as text."""
    return [
        subprocess.Popen(
            [sys.executable, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A script that hangs is then made to say where (run_scripts_together).
            env={**CHILD_ENV, "PYTHONFAULTHANDLER": "1"},
        )
        for command in commands
    ]


def load_script(path: Path) -> ModuleType:
    """The script at ``path`` imported as a module (its ``main(argv)`` then runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refusal(main: Callable[[list[str]], object], argv: list[str], capsys) -> str:
    """The last stderr line of ``main(argv)``, which must exit 2 (a refused argument)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def run_scripts_together(commands: list[list[str]], timeout_s: float) -> list[tuple[str, str]]:
    """Run ``python COMMAND`` for each command at once; each must exit 0 within ``timeout_s``.

    Returns:
        Each process's stdout and stderr, in order.
    """
    processes = start_scripts(commands)
    try:
        outputs = [process.communicate(timeout=timeout_s) for process in processes]
    except subprocess.TimeoutExpired:
        pytest.fail(_stacks_of_the_stuck(processes, commands, timeout_s), pytrace=False)
    finally:
        stop_processes(processes)
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
    return outputs


def _stacks_of_the_stuck(
    processes: list[subprocess.Popen], commands: list[list[str]], timeout_s: float
) -> str:
    """Why a script did not exit: SIGABRT to each one still running makes its faulthandler
    (on in every script ``start_scripts`` starts) print every thread's stack to stderr, which
    then says where it hangs."""
    said = []
    for process, command in zip(processes, commands, strict=True):
        if process.poll() is not None:
            continue
        process.send_signal(signal.SIGABRT)
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            err = "(no stack within 30 s of SIGABRT)"
        said.append(f"python {' '.join(command)} did not exit; its stderr ends:\n{err[-6000:]}")
    return f"within {timeout_s:g} s:\n" + "\n".join(said)


def _read_address(process: ForkedCommand | subprocess.Popen) -> str:
    deadline = time.monotonic() + _START_TIMEOUT_S
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = _ADDRESS_LINE.search(line)
        if match:
            return match.group(2)
        if not line and process.poll() is not None:
            break
    stop_processes([process])
    said = process.stderr_tail() if isinstance(process, ForkedCommand) else ""
    raise RuntimeError(
        f"shard process {process.pid} did not start (exit code {process.poll()})"
        + (f"; its stderr ends:\n{said}" if said else "")
    )


def private_loopback() -> str:
    """A loopback address (in 127.64.0.0 to 127.254.255.254) no other test binds.

    A shard restarted at its address must find its port free; on 127.0.0.1 a port let go is
    soon another process's, a server's or a client's source port (the suite runs thousands of
    connections at once), and the restart then fails as "address in use".
    """
    octets = random.randint(64, 254), random.randint(0, 255), random.randint(1, 254)
    return "127.{}.{}.{}".format(*octets)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def foreign_program() -> Iterator[str]:
    """The ``host:port`` of another program than this library's (a web server, say) on
    127.0.0.1: whatever a connection sends it, it answers with an HTTP error and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def answer(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(10)
            with contextlib.suppress(OSError):
                connection.recv(4096)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopping.set()
        server.join(10)
        listener.close()


def start_shard(
    shard_id: int, num_shards: int, *extra: str, forked: bool = True
) -> tuple[ForkedCommand | subprocess.Popen, str]:
    """Start ``distbelief ps`` on a free port (see ``_spawn_shard``); returns the process and
    its address."""
    process = _spawn_shard(shard_id, num_shards, *extra, forked=forked)
    return process, _read_address(process)


def stop_processes(processes: Sequence[subprocess.Popen | ForkedCommand]) -> None:
    """Terminate, wait, kill what is left: no process outlives a test."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def pause_process(pid: int, timeout_s: float = 30.0) -> None:
    """SIGSTOP ``pid`` and wait until ``/proc/<pid>/stat`` shows it stopped (state T): the
    signal is taken asynchronously, and a shard not yet stopped still answers."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    pytest.fail(f"process {pid} did not stop within {timeout_s:g} s of SIGSTOP")


def check_ctrl_c_ends_promptly_with_the_shard_gone(script: str, *shard_flags: str) -> None:
    """Run ``script`` (a training loop that prints ``training`` once it has started, given the
    shard's address as its argument) against a shard, end the shard, then Ctrl-C the script
    while its requests retry: it must end with the KeyboardInterrupt within 10 s, not wait out
    the retries."""
    process, address = start_shard(0, 1, *shard_flags)
    user = subprocess.Popen(
        [sys.executable, "-c", script, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        assert user.stdout is not None
        assert user.stdout.readline().strip() == "training"
        stop_processes([process])  # the shard is gone; the loop's requests now retry for 60 s
        time.sleep(1.0)
        started = time.monotonic()
        user.send_signal(signal.SIGINT)
        _, stderr = user.communicate(timeout=150)
        assert stderr.rstrip().endswith("KeyboardInterrupt"), stderr[-2000:]
        assert time.monotonic() - started < 10, "Ctrl-C waited for the retrying I/O threads"
    finally:
        stop_processes([process, user])


@pytest.fixture(params=["tcp", "shm"])
def scheme(request, monkeypatch) -> str:
    """Each channel kind in turn: ``tcp`` runs with DISTBELIEF_TRANSPORT=tcp (same-host
    connections would switch to shared memory otherwise), ``shm`` with ``shm://`` addresses."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp" if request.param == "tcp" else "auto")
    return request.param


@pytest.fixture
def shard_cluster() -> Iterator:
    """A factory: ``shard_cluster(num_shards, *flags)`` -> list of addresses."""
    started: list[ForkedCommand] = []

    def make(num_shards: int, *extra: str) -> list[str]:
        processes = [_spawn_shard(i, num_shards, *extra) for i in range(num_shards)]
        started.extend(processes)  # all start at once; then read each one's address
        return [_read_address(process) for process in processes]

    yield make
    stop_processes(started)


class StopAt:
    """A step hook (``run_worker``'s) that ends training at step ``last_step``."""

    def __init__(self, last_step: int) -> None:
        self.last_step = last_step

    def after_step(self, step: StepInfo) -> bool:
        return step.step >= self.last_step


@contextlib.contextmanager
def served_shards(
    num_shards: int, *, lr: float = 0.1, **shard_options: object
) -> Iterator[tuple[list[ParameterShard], list[str]]]:
    """ParameterShards with plain SGD at ``lr`` (and ``shard_options``: consistency,
    partitioner, num_workers) served on free ports of 127.0.0.1 in this process, and their
    addresses; stopped at the block's end."""
    from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
    from distbelief.wire import serve

    shards = [
        ParameterShard(i, num_shards, server_optimizer_factory("sgd", lr=lr), **shard_options)
        for i in range(num_shards)
    ]
    servers = []
    try:
        for shard in shards:
            servers.append(serve("tcp://127.0.0.1:0", ShardService(shard)))
        yield shards, [server.address for server in servers]
    finally:
        for server in servers:
            server.stop()
