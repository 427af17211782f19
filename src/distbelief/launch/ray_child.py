"""What runs one life of one role under Ray: a plain Python process on the role's node, forked
by the node's zygote (``zygote``) or, where there is none, started by the role's actor as
``python -m distbelief.launch.ray_child``. It links back to the launcher, runs the role,
reports its events, its result or its traceback over the link, as a local child does. Its
lifeline is a pipe whose writing end only its actor holds: EOF there (the actor was killed)
ends it at once, as a local child ends when the launcher's lifeline breaks.

The role runs here and not in the actor's own process, which Ray's threads share.

A job is the actor's pickled ``(events, info, payload)``: the launcher's event address, where
the process runs (node address and id), and the launcher's own pickled spec, config, shard
addresses and wire security (the job key never goes on argv or into the environment). Started
as a module, the process reads the job's length and the job from stdin, which then stays open
as its lifeline. Exit codes: 0 the role finished, 1 it failed (its traceback went over the
link), 3 its actor is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import sys
import threading
import traceback
from typing import TYPE_CHECKING

from distbelief.launch.child import ChannelEmitter
from distbelief.launch.entry import ROLE_MODULES, run_role
from distbelief.launch.remote_events import connect_events, watch_stop
from distbelief.launch.zygote import LENGTH

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.launch.cluster import ProcessSpec

ORPHAN_GRACE_S = 30.0
"""Seconds a process outlives its launcher's link before it leaves by itself."""
EXIT_DONE, EXIT_FAILED, EXIT_ORPHANED = 0, 1, 3


def _watch_actor(fd: int) -> None:
    # Only the actor holds the other end: EOF means it is gone (ray.kill, a node's end).
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass
    os._exit(EXIT_ORPHANED)


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def on_node(spec: ProcessSpec, config: JobConfig, node_ip: str) -> ProcessSpec:
    """``spec`` with a first start's listening address (any port of the configured host) moved
    to this node's address; a restart keeps its old address (it runs on the same node)."""
    if spec.bind == f"tcp://{config.cluster.host}:0":
        return dataclasses.replace(spec, bind=f"tcp://{node_ip}:0")
    return spec


def _join_process_group(process_group: int | None) -> None:
    """Moves this process into its actor's process group, where a fresh interpreter the actor
    starts is already. Ray ends a dead actor's process group; forked by the zygote, the process
    is in the node host's, whose death (a kill by its pid) would take every process of the job
    on that node with it."""
    if process_group is None:
        return
    with contextlib.suppress(OSError):  # a group of another session: the process stays put
        os.setpgid(0, process_group)


def run_job(job: bytes, lifeline: int) -> int:
    """Runs one job (see the module's docstring) to its end; its exit code."""
    events, info, payload = pickle.loads(job)
    _join_process_group(info.pop("process_group", None))
    os.environ.update(info.pop("env", {}))  # before torch touches a device
    spec, config, addresses, security = pickle.loads(payload)
    name = spec.name
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    signal.signal(signal.SIGTERM, _raise_system_exit)
    logging.basicConfig(
        level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s", force=True
    )
    threading.Thread(target=_watch_actor, args=(lifeline,), daemon=True).start()
    assert security.auth_key is not None, "the launcher always makes a job key"
    link = connect_events(events, security.auth_key, name, {**info, "pid": os.getpid()})
    stop = threading.Event()
    watch = threading.Thread(target=watch_stop, args=(link, stop, ORPHAN_GRACE_S), daemon=True)
    watch.start()
    emit = ChannelEmitter(link, name)
    spec = on_node(spec, config, info["node_ip"])
    try:
        result = run_role(emit, spec, config, addresses, security, stop)
    except SystemExit:
        raise
    except BaseException:
        emit("error", traceback.format_exc())
        return EXIT_FAILED
    emit("done", result)
    return EXIT_DONE


def _read_exact(fd: int, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = os.read(fd, count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def main() -> int:
    # The roles' imports first, as a zygote's children find them loaded.
    for module in ROLE_MODULES:
        __import__(module)
    stdin = sys.stdin.fileno()
    try:
        (length,) = LENGTH.unpack(_read_exact(stdin, LENGTH.size))
        job = _read_exact(stdin, length)
    except EOFError:  # the actor went away before giving this process a role
        return EXIT_ORPHANED
    return run_job(job, stdin)


if __name__ == "__main__":
    sys.exit(main())
