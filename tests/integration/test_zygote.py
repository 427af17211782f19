"""A node's zygote, without Ray: it forks a real shard for a job and reports its exit code; a
shard whose actor is killed (SIGKILL of the process holding its lifeline) ends at once; a
malformed request is refused and the zygote serves the next; a zygote that ends leaves its
children running until their own end; a killed zygote is started again; with no zygote a life
runs in a fresh interpreter; a life whose process is killed reports its signal."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from distbelief.config import JobConfig
from distbelief.launch.cluster import ProcessBook, ProcessKind
from distbelief.launch.entry import PRELOADED_MODULES
from distbelief.launch.ray_actor import DIED, DONE, NodeHost, run_life
from distbelief.launch.ray_child import EXIT_DONE
from distbelief.launch.ray_endings import Ending, ending_of_outcome
from distbelief.launch.remote_events import EventListener
from distbelief.launch.zygote import (
    EXIT_LOST,
    LENGTH,
    MAX_JOB_BYTES,
    abstract_address,
    fork_child,
)
from distbelief.wire.security import WireSecurity, generate_key

KEY = generate_key()
"""The job key of every job here (the listener's)."""
EVENT_TIMEOUT_S = 60.0
"""Generous: the zygote loads torch before it forks (seconds on a busy machine)."""


def _zygote() -> Iterator[tuple[str, NodeHost]]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    host = NodeHost(name, list(PRELOADED_MODULES))
    try:
        yield name, host
    finally:
        host.close()


# Shared by the tests that leave it running (it loads torch: seconds), one of its own for the
# test that ends it.
zygote = pytest.fixture(scope="module")(_zygote)
own_zygote = pytest.fixture(_zygote)


@pytest.fixture
def listener() -> Iterator[EventListener]:
    events = EventListener("127.0.0.1", KEY)
    try:
        yield events
    finally:
        events.close()


def _shard_job(listener: EventListener, out_dir: Path) -> bytes:
    """A real job: shard 0 of a default config, reporting to ``listener``."""
    config = JobConfig().with_fields({"reporting.out_dir": str(out_dir)})
    spec = ProcessBook(config).spec(ProcessKind.SHARD, 0)
    security = WireSecurity(auth_key=KEY)
    payload = pickle.dumps((spec, config, [], security))
    return pickle.dumps((listener.address, {"node_ip": "127.0.0.1", "node_id": "n"}, payload))


def _event(listener: EventListener, kind: str) -> tuple:
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while time.monotonic() < deadline:
        event = listener.get(0.1)
        if event is not None and event[0] == kind:
            return event
    raise AssertionError(f"no {kind!r} event within {EVENT_TIMEOUT_S:g}s")


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return True  # exited; its parent has not reaped it yet
        time.sleep(0.05)
    return False


def _connected(name: str) -> socket.socket:
    """A socket connected to the zygote ``name``, once it listens (it starts in a moment)."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(EVENT_TIMEOUT_S)
        try:
            sock.connect(abstract_address(name))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_forked_shard_runs_its_role_and_reports_its_exit(zygote, listener, tmp_path):
    name, host = zygote
    child = fork_child(abstract_address(name), _shard_job(listener, tmp_path))
    _, process, info = _event(listener, "hello")
    assert (process, info["pid"]) == ("shard0", child.pid)
    assert _parent_of(child.pid) == host.pid
    _event(listener, "ready")
    listener.send_stop("shard0")
    _event(listener, "done")
    assert child.wait() == EXIT_DONE


_ACTOR = """
import sys
from distbelief.launch.zygote import abstract_address, fork_child
child = fork_child(abstract_address(sys.argv[1]), sys.stdin.buffer.read())
print(child.pid, flush=True)
child.wait()
"""


def test_a_shard_whose_actor_is_killed_ends_at_once(zygote, listener, tmp_path):
    name, _ = zygote
    actor = subprocess.Popen(
        [sys.executable, "-c", _ACTOR, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        actor.stdin.write(_shard_job(listener, tmp_path))
        actor.stdin.close()
        pid = int(actor.stdout.readline())
        _event(listener, "ready")
        os.kill(actor.pid, signal.SIGKILL)
        assert _gone(pid, 30.0), "the shard outlived its actor"
    finally:
        actor.kill()
        actor.wait(10)


def test_a_malformed_request_is_refused_and_the_next_served(zygote, listener, tmp_path):
    name, _ = zygote
    with _connected(name) as rogue:
        rogue.sendall(b"\xff" * 8 + b"not a job")  # no lifeline attached
        # Closed without an answer (reset: it left the request's rest unread).
        with contextlib.suppress(ConnectionResetError):
            assert rogue.recv(8) == b""
    child = fork_child(abstract_address(name), _shard_job(listener, tmp_path))
    _event(listener, "ready")
    listener.send_stop("shard0")
    assert child.wait() == EXIT_DONE


def test_a_refused_request_leaves_no_lifeline_open_in_the_zygote(zygote):
    """Its lifeline arrived with the request: a zygote that kept it held one descriptor more
    for each refused request, and handed them all to every child it forked later."""
    name, host = zygote
    reader, writer = os.pipe()
    pipe = f"pipe:[{os.fstat(reader).st_ino}]"
    try:
        with _connected(name) as rogue:
            socket.send_fds(rogue, [LENGTH.pack(MAX_JOB_BYTES + 1)], [reader])
            with contextlib.suppress(ConnectionResetError):
                assert rogue.recv(8) == b""  # refused: closed without an answer

        def held() -> list[str]:
            with contextlib.suppress(FileNotFoundError):  # closed while listed
                return [
                    os.readlink(fd)
                    for fd in Path(f"/proc/{host.pid}/fd").iterdir()
                    if os.readlink(fd) == pipe
                ]
            return held()

        assert held() == []
    finally:
        os.close(reader)
        os.close(writer)


def test_children_outlive_their_zygote(own_zygote, listener, tmp_path):
    name, host = own_zygote
    child = fork_child(abstract_address(name), _shard_job(listener, tmp_path))
    _event(listener, "ready")
    host.close()
    assert not host.alive()
    os.kill(child.pid, 0)  # still serving
    listener.send_stop("shard0")
    _event(listener, "done")
    assert child.wait() == EXIT_LOST  # its exit code went with the zygote


def test_a_killed_zygote_is_started_again_and_forks_the_next(own_zygote, listener, tmp_path):
    name, host = own_zygote
    first = host.pid
    _connected(name).close()  # it listens
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while host.pid == first:  # its keeper starts another a moment after it is gone
        assert time.monotonic() < deadline, "the zygote was not started again"
        time.sleep(0.05)
    child = fork_child(abstract_address(name), _shard_job(listener, tmp_path))
    assert _parent_of(child.pid) == host.pid
    _event(listener, "ready")
    listener.send_stop("shard0")
    assert child.wait() == EXIT_DONE


def test_without_a_zygote_a_life_runs_in_a_fresh_interpreter(listener, tmp_path):
    import threading

    outcome: list[tuple[str, int]] = []
    job = _shard_job(listener, tmp_path)
    runner = threading.Thread(target=lambda: outcome.append(run_life(job, None, "shard0")))
    runner.start()
    _event(listener, "ready")
    listener.send_stop("shard0")
    runner.join(EVENT_TIMEOUT_S)
    assert outcome == [(DONE, 0)]


def test_a_life_whose_process_is_killed_reports_its_signal(zygote, listener, tmp_path):
    """SIGKILL of a forked shard's process while its actor lives: the life ends as a death with
    exit code -9, what summary.json's fault records for it (as the local launcher's does)."""
    import threading

    name, _ = zygote
    outcome: list[tuple[str, int]] = []
    job = _shard_job(listener, tmp_path)
    runner = threading.Thread(target=lambda: outcome.append(run_life(job, name, "shard0")))
    runner.start()
    _, _, hello = _event(listener, "hello")
    os.kill(hello["pid"], signal.SIGKILL)
    runner.join(EVENT_TIMEOUT_S)
    assert outcome == [(DIED, -signal.SIGKILL)]
    assert ending_of_outcome(outcome[0]) == Ending(-signal.SIGKILL)
