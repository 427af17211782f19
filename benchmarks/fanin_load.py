"""Fan-in load: N lightweight replicas (``fanin_replicas.py``) spread over a few processes
against running shards, started on one clock for a fixed time; pushes per replica, latencies
and errors gathered. Also starting and stopping ``distbelief ps`` shard processes for it.
Used by ``benchmarks/fanin.py`` and ``tests/integration/test_fanin.py``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from benchmarks.fanin_replicas import MODEL_SHAPES, LoadPlan, ReplicaLoop, model_layout

from distbelief.client import ParameterServerClient
from distbelief.wire.fd_limit import raise_fd_limit
from distbelief.wire.security import WireSecurity

_START_MARGIN_S = 1.0
_CHILD_GRACE_S = 60.0
_ADDRESSES_WAIT_S = 600.0
_SHARD_START_TIMEOUT_S = 120.0
_ADDRESS_LINE = re.compile(r"serving shard (\d+) at (tcp://\S+)")


@dataclass
class LoadResult:
    """What the replicas of one run did within the measured window."""

    pushes: list[int] = field(default_factory=list)
    """Completed pushes (to every shard) per replica."""
    pushes_by_process: list[list[int]] = field(default_factory=list)
    """``pushes``, split by load process: a process the machine runs less often slows all its
    replicas alike, so the shard's fairness shows among the replicas of one process."""
    push_latency_s: list[float] = field(default_factory=list)
    pull_latency_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connect_s: float = 0.0
    """The slowest process's time to open and introduce all its replicas' connections."""
    load_cpu_s: float = 0.0
    """CPU the load processes used in the window, all together."""
    duration_s: float = 0.0


def initialise_shards(addresses: list[str], model: str, auth_key: bytes | None) -> None:
    """Give the shards the model's initial parameters (what the first worker does)."""
    specs, partitioner, _, initial = model_layout(model, len(addresses))
    client = ParameterServerClient(
        addresses,
        specs,
        timeout_s=60,
        retry_timeout_s=30,
        security=WireSecurity(auth_key=auth_key),
        partitioner=partitioner,
    )
    try:
        client.handshake(initial)
    finally:
        client.close()


def _load_main(plan: LoadPlan, pipe) -> None:
    """A load process: wait for the shards' addresses, connect, report, wait for the start
    time, run, report the figures, keep the connections open until told."""
    torch.set_num_threads(1)
    try:
        if not pipe.poll(_ADDRESSES_WAIT_S) or (message := pipe.recv()) is None:
            return
    except EOFError:  # the parent is gone
        return
    addresses, duration_s = message
    raise_fd_limit(plan.num_replicas * len(addresses) + 256)
    load = ReplicaLoop(plan, addresses, duration_s)
    try:
        started = time.monotonic()
        try:
            load.connect()
        except Exception as e:
            pipe.send({"error": f"connecting: {type(e).__name__}: {e}"})
            return
        pipe.send({"connected_s": time.monotonic() - started})
        if not pipe.poll(_CHILD_GRACE_S + duration_s):
            return
        start_at = pipe.recv()
        if start_at is None:  # the parent gave up
            return
        cpu_before = _cpu_s()
        load.run(start_at)
        pipe.send(
            {
                "pushes": [replica.pushes for replica in load.replicas],
                "push_latency_s": load.push_latency_s,
                "pull_latency_s": load.pull_latency_s,
                "errors": load.errors,
                "cpu_s": _cpu_s() - cpu_before,
            }
        )
        pipe.poll(_CHILD_GRACE_S)  # connections stay open until the parent has looked
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone
    finally:
        load.close()
        pipe.close()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def split_replicas(num_replicas: int, num_processes: int) -> list[tuple[int, int]]:
    """(first replica, count) per process, as even as can be."""
    num_processes = max(1, min(num_processes, num_replicas))
    base, extra = divmod(num_replicas, num_processes)
    spans, first = [], 0
    for index in range(num_processes):
        count = base + (1 if index < extra else 0)
        spans.append((first, count))
        first += count
    return spans


class LoadProcesses:
    """``num_replicas`` replicas over ``num_processes`` spawned processes, started (paying for
    their imports) before the shards are known; :meth:`run` then drives them once.

    Args:
        num_replicas: Replicas in all, spread evenly.
        num_processes: Processes of replicas.
        model: One of ``MODEL_SHAPES``.
        auth_key: The job key (None: the shards run without one).
    """

    def __init__(
        self,
        num_replicas: int,
        *,
        num_processes: int = 2,
        model: str = "mlp",
        auth_key: bytes | None = None,
    ) -> None:
        if model not in MODEL_SHAPES:
            raise ValueError(f"model {model!r}: choose one of {', '.join(MODEL_SHAPES)}")
        context = mp.get_context("spawn")
        self.num_replicas = num_replicas
        self._processes, self._pipes = [], []
        try:
            for first, count in split_replicas(num_replicas, num_processes):
                plan = LoadPlan(first, count, model, auth_key)
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_load_main, args=(plan, child_end), daemon=True)
                process.start()
                child_end.close()
                self._processes.append(process)
                self._pipes.append(parent_end)
        except BaseException:
            self.close()
            raise

    def run(self, addresses: list[str], duration_s: float, on_window=None) -> LoadResult:
        """Every replica against the shards at ``addresses`` for ``duration_s``.

        The shards must already hold the model (``initialise_shards``). ``on_window(stage)`` is
        called at the start (``"start"``) and the end (``"end"``) of the measured window, and
        once every process has reported but before any closes its connections (``"open"``):
        to sample the shards.

        Raises:
            RuntimeError: a load process could not connect its replicas, or did not report.
        """
        pipes = self._pipes
        for pipe in pipes:
            pipe.send((tuple(addresses), duration_s))
        connect_limit_s = _CHILD_GRACE_S + 5 * self.num_replicas / 100
        connected = [_receive(pipe, connect_limit_s) for pipe in pipes]
        start_at = time.time() + _START_MARGIN_S
        for pipe in pipes:
            pipe.send(start_at)
        on_window = on_window or (lambda stage: None)
        time.sleep(max(0.0, start_at - time.time()))
        on_window("start")
        time.sleep(max(0.0, start_at + duration_s - time.time()))
        on_window("end")
        reports = [_receive(pipe, duration_s + _CHILD_GRACE_S) for pipe in pipes]
        on_window("open")
        for pipe in pipes:
            pipe.send("close")
        result = LoadResult(duration_s=duration_s)
        result.connect_s = max(report["connected_s"] for report in connected)
        for report in reports:
            result.pushes += report["pushes"]
            result.pushes_by_process.append(report["pushes"])
            result.push_latency_s += report["push_latency_s"]
            result.pull_latency_s += report["pull_latency_s"]
            result.errors += report["errors"]
            result.load_cpu_s += report["cpu_s"]
        return result

    def close(self) -> None:
        """Stop every process (ones still waiting for addresses are told to end)."""
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # it has ended already
                pipe.send(None)
        for process in self._processes:
            process.join(2)
            if process.is_alive():  # done with its work, tearing down its interpreter
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for pipe in self._pipes:
            pipe.close()

    def __enter__(self) -> LoadProcesses:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_fanin(
    addresses: list[str],
    num_replicas: int,
    duration_s: float,
    *,
    num_processes: int = 2,
    model: str = "mlp",
    auth_key: bytes | None = None,
    on_window=None,
) -> LoadResult:
    """``LoadProcesses(...).run(...)`` in one call (their start-up not overlapped)."""
    options = {"num_processes": num_processes, "model": model, "auth_key": auth_key}
    with LoadProcesses(num_replicas, **options) as load:
        return load.run(addresses, duration_s, on_window)


def _receive(pipe, timeout_s: float) -> dict:
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"a load process did not report within {timeout_s:g}s")
    report = pipe.recv()
    if isinstance(report, dict) and "error" in report:
        raise RuntimeError(f"a load process failed {report['error']}")
    return report


def start_shards(
    num_shards: int,
    key_file: Path,
    *flags: str,
    log_dir: Path | None = None,
    open_files: tuple[int, int] | None = None,
) -> tuple[list[subprocess.Popen], list[str]]:
    """``distbelief ps`` for each shard on a free port of 127.0.0.1, with the job key and
    ``flags``; returns the processes and their addresses (stop them with ``stop_shards``).

    ``log_dir``: each shard's log goes to ``shard-I.log`` there (default: dropped).
    ``open_files``: (soft, hard) open-file limits the shards start with (default: ours).
    """
    command = [sys.executable, "-m", "distbelief", "ps", "--num-shards", str(num_shards)]
    command += ["--bind", "tcp://127.0.0.1:0", "--auth-key-file", str(key_file), *flags]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    processes: list[subprocess.Popen] = []
    try:
        for shard_id in range(num_shards):
            log_path = os.devnull if log_dir is None else log_dir / f"shard-{shard_id}.log"
            with open(log_path, "w") as log:  # the child keeps its own descriptor
                processes.append(
                    subprocess.Popen(
                        [*command, "--shard-id", str(shard_id)],
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                        env=environment,
                        preexec_fn=limit_open_files,
                    )
                )
        return processes, [_shard_address(process) for process in processes]
    except BaseException:
        stop_shards(processes)
        raise


def _shard_address(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + _SHARD_START_TIMEOUT_S
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = _ADDRESS_LINE.search(line)
        if match:
            return match.group(2)
        if not line and process.poll() is not None:
            break
    raise RuntimeError(f"shard process {process.pid} did not start")


def stop_shards(processes: list[subprocess.Popen]) -> None:
    """SIGTERM, wait, SIGKILL what is left."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
