"""The Ray actors of a job. A ``RoleActor`` keeps one process of the job (a shard, a worker,
the evaluator, the coordinator): each call of ``run`` starts one life of that process on the
actor's node and waits for it to end. The process is forked by the node's zygote, which a
``NodeHost`` actor keeps for the job's lifetime (one per node); where a node has none, it is
started as a fresh interpreter. Ray places, watches and re-creates the actors; the roles never
run inside Ray's worker processes. Killing an actor ends its process (its lifeline closes).
Imports nothing heavy: an actor is light.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from distbelief.launch.zygote import LENGTH, ZygoteUnavailable, abstract_address, fork_child

logger = logging.getLogger(__name__)

SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding the ``distbelief`` package this actor was loaded from."""
DONE, ERROR, DIED = "done", "error", "died"
"""What ``run`` returns, with the process's exit code: the role finished, it failed (its
traceback went over its link), or its process died (killed, or its node's memory ran out)."""
_EXIT_DONE, _EXIT_FAILED = 0, 1
MAX_ZYGOTE_STARTS = 10
ZYGOTE_RESTART_PAUSE_S = 1.0
ACTOR_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
"""Variables Ray sets per actor, passed on to the actor's process."""


def _start_module(module: str, *args: str) -> subprocess.Popen:
    """``python -m module args`` with a pipe on stdin, able to import this package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE, env=env)


def _run_started(job: bytes) -> int:
    """Runs ``job`` in a fresh interpreter; its exit code."""
    child = _start_module("distbelief.launch.ray_child")
    assert child.stdin is not None
    try:
        child.stdin.write(LENGTH.pack(len(job)) + job)
        child.stdin.flush()  # kept open: its end tells the process this actor is gone
    except OSError:  # the process died before it took its role
        pass
    try:
        return child.wait()
    finally:
        child.stdin.close()


class RoleActor:
    """One process of a job as a Ray actor.

    Args:
        name: the process's name (``shard0``, ``worker3``, ...).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")

    def placed(self) -> bool:
        """Answers once Ray has given this actor its CPUs and made it: what the launcher waits
        for, within a bound, before the ``run`` that follows."""
        return True

    def run(
        self, events: tuple[str, int], payload: bytes, zygotes: dict[str, str]
    ) -> tuple[str, int]:
        """Runs one life of the process: its role (``payload``: the launcher's pickled spec,
        config, shard addresses and wire security) to its end, reporting to the launcher at
        ``events``. ``zygotes``: node id -> name of that node's zygote.

        Returns:
            DONE, ERROR or DIED (see there) and the process's exit code (-N: signal N); the
            result, or the traceback, went over the link.
        """
        import ray  # in the actor's process, where Ray is running already

        node_id = ray.get_runtime_context().get_node_id()
        info = {"node_ip": ray.util.get_node_ip_address(), "node_id": node_id}
        info["actor_pid"] = os.getpid()
        info["process_group"] = os.getpgid(0)  # the process joins it (see ``ray_child``)
        # What Ray set for this actor (its devices, its threads) and the zygote's fork lacks.
        info["env"] = {name: os.environ[name] for name in ACTOR_ENVIRONMENT if name in os.environ}
        return run_life(pickle.dumps((events, info, payload)), zygotes.get(node_id), self.name)


def run_life(job: bytes, zygote: str | None, name: str) -> tuple[str, int]:
    """Runs ``job`` (see ``ray_child``) in a process forked by the zygote called ``zygote``, or
    in a fresh interpreter if there is none or it fails; DONE, ERROR or DIED, and its exit
    code."""
    code = None
    if zygote is not None:
        try:
            code = fork_child(abstract_address(zygote), job).wait()
        except ZygoteUnavailable as e:
            logger.warning("%s: starting a fresh interpreter (%s)", name, e)
    if code is None:
        code = _run_started(job)
    return {_EXIT_DONE: DONE, _EXIT_FAILED: ERROR}.get(code, DIED), code


class NodeHost:
    """Keeps the job's zygote of one node: started when the actor is made, started again if it
    dies (up to MAX_ZYGOTE_STARTS times in all: a node's later restarts must not each wait for
    a zygote that is gone), ended when the actor is (its stdin closes) or by ``close``.

    Args:
        name: the zygote's name (its abstract socket's).
        preload: the modules it loads before it forks (``launch/entry.py``'s
            ``PRELOADED_MODULES``).
    """

    def __init__(self, name: str, preload: Sequence[str]) -> None:
        self._name = name
        self._preload = list(preload)
        self._lock = threading.Lock()
        self._closing = False
        self._zygote = _start_module("distbelief.launch.zygote", name, *self._preload)
        threading.Thread(target=self._keep, name="zygote keeper", daemon=True).start()

    def _keep(self) -> None:
        for _ in range(MAX_ZYGOTE_STARTS - 1):
            code = self._zygote.wait()
            time.sleep(ZYGOTE_RESTART_PAUSE_S)  # its name is free again by then
            with self._lock:
                if self._closing:
                    return
                logger.warning(
                    "zygote %s ended (exit code %s): starting it again", self._name, code
                )
                self._zygote = _start_module("distbelief.launch.zygote", self._name, *self._preload)

    @property
    def pid(self) -> int:
        return self._zygote.pid

    def alive(self) -> bool:
        return self._zygote.poll() is None

    def close(self, timeout_s: float = 10.0) -> None:
        """Ends the zygote (its children live on, each until its own end)."""
        with self._lock:
            self._closing = True
            zygote = self._zygote
        assert zygote.stdin is not None
        zygote.stdin.close()
        try:
            zygote.wait(timeout_s)
        except subprocess.TimeoutExpired:
            zygote.kill()
            zygote.wait(timeout_s)
