"""The local cluster: start shards, workers and an evaluator as processes on one host, supervise
them, write the run folder, and stop every process on success, failure or Ctrl-C."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distbelief.data import load_dataset, worker_indices
from distbelief.errors import ChildFailedError, DistBeliefError
from distbelief.launch import evaluator, roles
from distbelief.launch.child import run_child
from distbelief.launch.config import TrainConfig
from distbelief.launch.progress import ProgressDisplay
from distbelief.launch.rundir import prepare_run_dir, write_json_atomic
from distbelief.metrics import MetricsWriter
from distbelief.plotting import plot_run

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 60.0
_STOP_GRACE_S = 5.0
_POLL_S = 0.2


class LauncherInterrupted(DistBeliefError):
    """Ctrl-C or SIGTERM reached the launcher."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise LauncherInterrupted(f"stopped by signal {signal.Signals(signum).name}")


def _shard_main(name, events, shard_id, config: TrainConfig, stop) -> Any:
    return roles.serve_shard(
        shard_id,
        config.num_shards,
        f"tcp://{config.host}:0",
        optimizer_factory=config.server_optimizer_factory(),
        consistency=config.consistency(),
        emit=_emitter(events, name),
        stop=stop,
    )


def _worker_main(name, events, rank, config, addresses, start_time) -> Any:
    return roles.run_worker(
        config, rank, addresses, emit=_emitter(events, name), start_time=start_time
    )


def _evaluator_main(name, events, config, addresses, start_time, stop) -> Any:
    return evaluator.run_evaluator(
        config, addresses, emit=_emitter(events, name), start_time=start_time, stop=stop
    )


def _emitter(events, name: str):
    return lambda kind, payload: events.put((kind, name, payload))


@dataclass
class RunResult:
    """How a training job ended."""

    run_dir: Path
    final: dict = field(default_factory=dict)
    worker_steps: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    staleness: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per shard: how many pushes arrived with each staleness."""


class LocalCluster:
    """One job's processes. Use as a context manager: leaving it stops every process."""

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.ctx = mp.get_context("spawn")
        self.events = self.ctx.Queue()
        self.shard_stop = self.ctx.Event()
        self.eval_stop = self.ctx.Event()
        self.processes: dict[str, mp.process.BaseProcess] = {}
        self.errors: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.start_time = time.time()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()

    def _start(self, name: str, target, *args) -> None:
        process = self.ctx.Process(
            target=run_child,
            args=(name, self.events, target, name, self.events, *args),
            name=name,
            daemon=True,
        )
        process.start()
        self.processes[name] = process

    def start_shards(self) -> list[str]:
        """Start every shard and return their addresses (bound to free ports)."""
        for shard_id in range(self.config.num_shards):
            self._start(f"shard{shard_id}", _shard_main, shard_id, self.config, self.shard_stop)
        addresses: dict[int, str] = {}
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while len(addresses) < self.config.num_shards:
            event = self.next_event(deadline - time.monotonic())
            if event is not None and event[0] == "ready":
                addresses[event[2]["shard_id"]] = event[2]["address"]
            elif time.monotonic() > deadline:
                raise ChildFailedError("shards", None, f"not ready in {_READY_TIMEOUT_S:g}s")
        return [addresses[i] for i in range(self.config.num_shards)]

    def start_workers(self, addresses: list[str]) -> None:
        for rank in range(self.config.num_workers):
            self._start(f"worker{rank}", _worker_main, rank, self.config, addresses, 0.0)

    def start_evaluator(self, addresses: list[str]) -> None:
        self._start("evaluator", _evaluator_main, self.config, addresses, 0.0, self.eval_stop)

    def next_event(self, timeout_s: float = _POLL_S) -> tuple | None:
        """The next child event (metrics are returned too); raises if a child has failed."""
        try:
            event = self.events.get(timeout=max(0.0, min(timeout_s, _POLL_S)))
        except queue.Empty:
            event = None
        if event is not None and event[0] == "error":
            self.errors[event[1]] = event[2]
        elif event is not None and event[0] == "done":
            self.results[event[1]] = event[2]
        self._check_children()
        return event

    def _check_children(self) -> None:
        for name, process in self.processes.items():
            if process.exitcode not in (None, 0):
                self._drain_errors()
                raise ChildFailedError(name, process.exitcode, self.errors.get(name, ""))

    def _drain_errors(self) -> None:
        # The child reports its traceback just before exiting; give the queue a moment.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                kind, name, payload = self.events.get(timeout=0.1)
            except queue.Empty:
                break
            if kind == "error":
                self.errors[name] = payload

    def finished(self, prefix: str) -> bool:
        """Whether every process whose name starts with ``prefix`` has exited cleanly."""
        return all(p.exitcode == 0 for name, p in self.processes.items() if name.startswith(prefix))

    def stop_all(self) -> None:
        """Ask every child to stop, then terminate and finally kill the ones that do not."""
        self.eval_stop.set()
        self.shard_stop.set()
        for process in self.processes.values():
            process.join(timeout=_STOP_GRACE_S if process.exitcode is None else 0)
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(timeout=_STOP_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join(timeout=_STOP_GRACE_S)


def _planned_steps(config: TrainConfig) -> int:
    if config.steps is not None:
        return config.steps * config.num_workers
    train_set = load_dataset(
        config.dataset, split="train", data_dir=config.data_dir, download=config.download
    )
    num_train = len(train_set)
    return (
        sum(
            len(worker_indices(num_train, rank, config.num_workers)) // config.batch_size
            for rank in range(config.num_workers)
        )
        * config.num_epochs
    )


class _Router:
    """Routes child events to the CSV and the display; times count from the first worker's
    start (children report wall-clock times; process start-up is not training time)."""

    def __init__(self, writer: MetricsWriter, progress: ProgressDisplay) -> None:
        self.writer = writer
        self.progress = progress
        self.train_start: float | None = None

    def __call__(self, event: tuple | None) -> None:
        if event is None:
            return
        kind, name, payload = event
        if kind == "started" and self.train_start is None:
            self.train_start = payload["time"]
        elif kind == "metric":
            start = self.train_start if self.train_start is not None else payload["time_s"]
            record = {**payload, "time_s": max(0.0, payload["time_s"] - start)}
            self.writer.write(record)
            self.progress.update(record)
        elif kind == "done" and name.startswith("worker"):
            self.progress.message(f"{name} finished after {payload['steps']} steps")


def _supervise(cluster: LocalCluster, route: _Router) -> None:
    """Route events until the workers finish, then stop the evaluator (after its final
    evaluation) and the shards (which report their counters), in that order."""
    for role, stop in (
        ("worker", None),
        ("evaluator", cluster.eval_stop),
        ("shard", cluster.shard_stop),
    ):
        if stop is not None:
            stop.set()
        while not cluster.finished(role):
            route(cluster.next_event())
    while (event := cluster.next_event(0.05)) is not None:
        route(event)


def train(config: TrainConfig) -> RunResult:
    """Run a whole job on this host; returns when every process has stopped.

    Raises:
        ChildFailedError: a shard, worker or the evaluator failed; every process is stopped.
        LauncherInterrupted: Ctrl-C or SIGTERM; every process is stopped.
    """
    run_dir = prepare_run_dir(config.out_dir)
    write_json_atomic(run_dir / "config.json", config.to_json())
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    total_steps = _planned_steps(config)
    try:
        with (
            LocalCluster(config, run_dir) as cluster,
            MetricsWriter(run_dir / "metrics.csv") as writer,
            ProgressDisplay(total_steps=total_steps, num_workers=config.num_workers) as progress,
        ):
            addresses = cluster.start_shards()
            cluster.start_evaluator(addresses)
            cluster.start_workers(addresses)
            _supervise(cluster, _Router(writer, progress))
            result = RunResult(
                run_dir,
                final=cluster.results.get("evaluator", {}),
                worker_steps={
                    int(k[6:]): v["steps"]
                    for k, v in cluster.results.items()
                    if k.startswith("worker")
                },
                elapsed_s=time.time() - cluster.start_time,
                staleness={
                    k: v["staleness"] for k, v in cluster.results.items() if k.startswith("shard")
                },
            )
    except KeyboardInterrupt as e:
        raise LauncherInterrupted("stopped by Ctrl-C") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_json_atomic(run_dir / "summary.json", _summary_json(result))
    write_json_atomic(run_dir / "staleness.json", json.dumps(result.staleness, indent=2))
    plot_run(run_dir)
    logger.info("run folder: %s (pid %d)", run_dir, os.getpid())
    return result


def _summary_json(result: RunResult) -> str:
    return json.dumps(
        {
            "final": result.final,
            "worker_steps": result.worker_steps,
            "elapsed_s": round(result.elapsed_s, 3),
        },
        indent=2,
    )
