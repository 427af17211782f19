"""LocalCluster: the processes of one job on this host (shards, workers, evaluator), their
events, and their restarts when they die; it knows nothing of CSVs or displays."""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distbelief.config import JobConfig
from distbelief.errors import ChildFailedError
from distbelief.launch import evaluator, roles
from distbelief.launch.child import EventInbox, SharedStopFlag, run_child
from distbelief.launch.rundir import write_json_atomic
from distbelief.server.optimizers import server_optimizer_from_config
from distbelief.server.process import serve_shard
from distbelief.wire.security import WireSecurity, generate_key

CHECKPOINT_DIR = "checkpoints"
_READY_TIMEOUT_S = 60.0
_STOP_GRACE_S = 5.0
_POLL_S = 0.2


def _shard_main(emit, shard_id, config: JobConfig, stop, bind, security) -> Any:
    return serve_shard(
        shard_id,
        config.cluster.num_shards,
        bind,
        optimizer_factory=server_optimizer_from_config(config.server),
        consistency=config.consistency,
        num_workers=config.cluster.num_workers,
        security=security,
        checkpoint_dir=str(Path(config.reporting.out_dir) / CHECKPOINT_DIR),
        checkpoint_every_s=config.server.checkpoint_every_s,
        emit=emit,
        stop=stop,
    )


def _worker_main(emit, rank, config, addresses, security, resume_step) -> Any:
    return roles.run_worker(
        config,
        rank,
        addresses,
        emit=emit,
        start_time=0.0,
        security=security,
        resume_step=resume_step,
    )


def _evaluator_main(emit, config, addresses, stop, security) -> Any:
    return evaluator.run_evaluator(
        config,
        addresses,
        emit=emit,
        start_time=0.0,
        stop=stop,
        security=security,
    )


@dataclass
class Fault:
    """A process that died without reporting an error, and what the launcher did about it."""

    process: str
    time_s: float
    """Seconds since training started (the time axis of metrics.csv)."""
    exitcode: int | None
    action: str
    """"restarted" or "given up"."""
    version_before: int | None = None
    """Shards: the last version the shard reported before it died."""
    version_restored: int | None = None
    """Shards: the version its checkpoint restored."""

    @property
    def lost_updates(self) -> int | None:
        if self.version_before is None or self.version_restored is None:
            return None
        return max(0, self.version_before - self.version_restored)


class LocalCluster:
    """One job's processes. Use as a context manager: leaving it stops every process.

    A process that dies without reporting a Python error (killed, crashed) is restarted up to
    ``max_restarts`` times: a shard on its old address from its last checkpoint, a worker from
    the shards' parameters at the step it had reached. A worker that stays dead is left out;
    a process that reports an error stops the job.
    """

    def __init__(self, config: JobConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.ctx = mp.get_context("spawn")
        self.events = EventInbox()
        self.shard_stop = SharedStopFlag(self.ctx)
        self.eval_stop = SharedStopFlag(self.ctx)
        # The job's secret travels to children through spawn's private pipe, never argv/env.
        self.security = WireSecurity(auth_key=generate_key())
        self.processes: dict[str, mp.process.BaseProcess] = {}
        self.errors: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.start_time = time.time()
        self.addresses: list[str] = []
        self.restarts: dict[str, int] = {}
        self.given_up: set[str] = set()
        self.faults: list[Fault] = []
        self.last_step: dict[int, int] = {}
        self.shard_versions: dict[int, int] = {}
        self.train_start: float | None = None
        """Wall time the first worker started training (metrics count time from there)."""
        self._backlog: collections.deque[tuple] = collections.deque()
        self.on_fault: Any = None
        """Called with each Fault (the launcher shows it)."""

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()

    def _start(self, name: str, target, *args) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=run_child,
            args=(name, writer, os.getpid(), target, *args),
            name=name,
            daemon=True,
        )
        process.start()
        writer.close()  # the child holds its end now; EOF here means the child is gone
        self.events.add(reader)
        self.processes[name] = process
        write_json_atomic(
            self.run_dir / "pids.json",
            json.dumps({n: p.pid for n, p in self.processes.items()}, indent=1),
        )

    def _start_shard(self, shard_id: int, bind: str) -> None:
        self._start(
            f"shard{shard_id}",
            _shard_main,
            shard_id,
            self.config,
            self.shard_stop,
            bind,
            self.security,
        )

    def start_shards(self) -> list[str]:
        """Start every shard and return their addresses (bound to free ports)."""
        for shard_id in range(self.config.cluster.num_shards):
            self._start_shard(shard_id, f"tcp://{self.config.cluster.host}:0")
        addresses: dict[int, str] = {}
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while len(addresses) < self.config.cluster.num_shards:
            event = self.next_event(deadline - time.monotonic())
            if event is not None and event[0] == "ready":
                addresses[event[2]["shard_id"]] = event[2]["address"]
            elif time.monotonic() > deadline:
                raise ChildFailedError("shards", None, f"not ready in {_READY_TIMEOUT_S:g}s")
        self.addresses = [addresses[i] for i in range(self.config.cluster.num_shards)]
        return self.addresses

    def _start_worker(self, rank: int) -> None:
        self._start(
            f"worker{rank}",
            _worker_main,
            rank,
            self.config,
            self.addresses,
            self.security,
            self.last_step.get(rank, 0),
        )

    def start_workers(self) -> None:
        for rank in range(self.config.cluster.num_workers):
            self._start_worker(rank)

    def start_evaluator(self) -> None:
        self._start(
            "evaluator", _evaluator_main, self.config, self.addresses, self.eval_stop, self.security
        )

    def next_event(self, timeout_s: float = _POLL_S) -> tuple | None:
        """The next child event (metrics are returned too); restarts processes that died;
        raises if a child reported an error or a shard cannot be brought back."""
        if self._backlog:
            return self._backlog.popleft()
        event = self.events.get(max(0.0, min(timeout_s, _POLL_S)))
        if event is not None:
            self._note(event)
        self._check_children()
        return event

    def _note(self, event: tuple) -> None:
        kind, name, payload = event
        if kind == "error":
            self.errors[name] = payload
        elif kind == "done":
            self.results[name] = payload
        elif kind == "started" and self.train_start is None:
            self.train_start = payload["time"]
        elif kind == "heartbeat":
            self.shard_versions[payload["shard_id"]] = payload["version"]
        elif kind == "metric" and payload.get("role") == "worker":
            self.last_step[payload["rank"]] = payload["step"]
            # Every shard applies every push, so a worker's view bounds each shard's version.
            for shard_id in range(self.config.cluster.num_shards):
                seen = max(self.shard_versions.get(shard_id, 0), payload.get("version") or 0)
                self.shard_versions[shard_id] = seen
        elif kind == "ready" and payload.get("restored_version") is not None:
            for fault in reversed(self.faults):
                if fault.process == name and fault.version_restored is None:
                    fault.version_restored = payload["restored_version"]
                    self.shard_versions[payload["shard_id"]] = payload["restored_version"]
                    break

    def _check_children(self) -> None:
        for name, process in list(self.processes.items()):
            if process.exitcode in (None, 0) or name in self.given_up:
                continue
            self._drain_errors()
            if name in self.errors:
                raise ChildFailedError(name, process.exitcode, self.errors[name])
            self._handle_death(name, process.exitcode)

    def _handle_death(self, name: str, exitcode: int | None) -> None:
        restarts = self.restarts.get(name, 0)
        can_restart = restarts < self.config.faults.max_restarts and not self.shard_stop.is_set()
        fault = Fault(name, time.time(), exitcode, "restarted" if can_restart else "given up")
        fault.time_s = time.time() - (self.train_start or self.start_time)
        if name.startswith("shard"):
            fault.version_before = self.shard_versions.get(int(name[5:]))
        self.faults.append(fault)
        if self.on_fault is not None:
            self.on_fault(fault)
        if not can_restart:
            if not name.startswith("worker"):
                raise ChildFailedError(name, exitcode, "died and was not restarted")
            self.given_up.add(name)
            if all(f"worker{r}" in self.given_up for r in range(self.config.cluster.num_workers)):
                raise ChildFailedError("every worker", exitcode, "all workers died")
            return
        self.restarts[name] = restarts + 1
        if name.startswith("shard"):
            shard_id = int(name[5:])
            self._start_shard(shard_id, self.addresses[shard_id])
        elif name.startswith("worker"):
            self._start_worker(int(name[6:]))
        else:
            self.start_evaluator()

    def _drain_errors(self) -> None:
        """Read what dead children sent before exiting (their pipes hold it all already)."""
        while (event := self.events.get(0.0)) is not None:
            self._note(event)
            self._backlog.append(event)

    def finished(self, prefix: str) -> bool:
        """Whether every process whose name starts with ``prefix`` has exited cleanly (or
        been given up on)."""
        return all(
            p.exitcode == 0 or name in self.given_up
            for name, p in self.processes.items()
            if name.startswith(prefix)
        )

    def stop_all(self) -> None:
        """Stop every child: workers and the evaluator first (SIGTERM), then the shards (their
        stop flag, so they write a last checkpoint), then whatever is left (SIGKILL)."""
        self.eval_stop.set()
        clients = [p for n, p in self.processes.items() if not n.startswith("shard")]
        shards = [p for n, p in self.processes.items() if n.startswith("shard")]
        for process in clients:
            if process.is_alive():
                process.terminate()
        _join_all(clients, _STOP_GRACE_S)
        self.shard_stop.set()
        _join_all(shards, _STOP_GRACE_S)
        for process in self.processes.values():
            if process.is_alive():
                process.kill()
        _join_all(list(self.processes.values()), _STOP_GRACE_S)


def _join_all(processes: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
