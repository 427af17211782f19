"""The local cluster: start shards, workers and an evaluator as processes on one host, supervise
them, write the run folder, and stop every process on success, failure or Ctrl-C."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from distbelief.data import load_dataset, worker_indices
from distbelief.errors import LauncherInterrupted
from distbelief.launch.cluster import CHECKPOINT_DIR, Fault, LocalCluster
from distbelief.launch.config import TrainConfig
from distbelief.launch.rundir import prepare_run_dir, write_json_atomic
from distbelief.plots import plot_run
from distbelief.telemetry import MetricsWriter, ProgressDisplay, ShardStatsPoller, TensorBoardLog

logger = logging.getLogger(__name__)


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise LauncherInterrupted(f"stopped by signal {signal.Signals(signum).name}")


@dataclass
class RunResult:
    """How a training job ended."""

    run_dir: Path
    final: dict = field(default_factory=dict)
    worker_steps: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    staleness: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per shard: how many pushes arrived with each staleness."""
    faults: list[Fault] = field(default_factory=list)
    """Processes that died during the run and what became of them."""


def _planned_steps(config: TrainConfig) -> list[int]:
    """Steps each worker will run; ValueError if the warmstart outlasts worker 0's pushes."""
    if config.steps is not None:
        steps = [config.steps] * config.num_workers
    else:
        train_set = load_dataset(
            config.dataset, split="train", data_dir=config.data_dir, download=config.download
        )
        steps = [
            len(worker_indices(len(train_set), rank, config.num_workers))
            // config.batch_size
            * config.num_epochs
            for rank in range(config.num_workers)
        ]
    pushes_of_worker0 = -(-steps[0] // config.n_push)  # a last partial window is flushed
    if config.warmstart_steps > pushes_of_worker0:
        raise ValueError(
            f"warmstart_steps {config.warmstart_steps} exceeds the {pushes_of_worker0} pushes "
            "worker 0 will make: the other workers would never start"
        )
    return steps


class _Router:
    """Routes child events to the CSV and the display; times count from the first worker's
    start (children report wall-clock times; process start-up is not training time). Records
    also go to TensorBoard, and ``poll_shards`` adds the shards' counters as ``shard`` records."""

    def __init__(
        self,
        writer: MetricsWriter,
        progress: ProgressDisplay,
        tensorboard: TensorBoardLog | None = None,
        shard_poller: ShardStatsPoller | None = None,
    ) -> None:
        self.writer = writer
        self.progress = progress
        self.tensorboard = tensorboard
        self.shard_poller = shard_poller
        self.train_start: float | None = None

    def poll_shards(self) -> None:
        """Routes the shards' counters if a poll is due (cheap to call in any loop)."""
        if self.shard_poller is not None:
            for record in self.shard_poller.poll_if_due():
                self(("metric", "launcher", record))

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
            self.progress.write(record)
            if self.tensorboard is not None:
                self.tensorboard.write(record)
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
            if role == "worker":
                route.poll_shards()
    while (event := cluster.next_event(0.05)) is not None:
        route(event)


def _prepare(config: TrainConfig, resume: bool) -> tuple[TrainConfig, Path]:
    """The run folder and the config with its path filled in; refuses to mix runs."""
    run_dir = prepare_run_dir(config.out_dir)
    has_checkpoints = any((run_dir / CHECKPOINT_DIR).glob("shard*.json"))
    if resume and not has_checkpoints:
        raise ValueError(f"--resume {run_dir}: no shard checkpoints in {run_dir / CHECKPOINT_DIR}")
    if has_checkpoints and not resume:
        raise ValueError(f"--out {run_dir} holds another run's checkpoints: use --resume {run_dir}")
    config = config.replace(out_dir=str(run_dir))
    write_json_atomic(run_dir / "config.json", config.to_json())
    return config, run_dir


def train(config: TrainConfig, *, resume: bool = False) -> RunResult:
    """Run a whole job on this host; returns when every process has stopped.

    Args:
        config: The job.
        resume: Continue the run in ``config.out_dir`` from its shard checkpoints.

    Raises:
        ChildFailedError: a process reported an error, or could not be brought back; every
            process is stopped.
        LauncherInterrupted: Ctrl-C or SIGTERM; every process is stopped.
        CheckpointError: a checkpoint to resume from is corrupt (names the file).
    """
    total_steps = sum(_planned_steps(config))  # validates before anything is written
    config, run_dir = _prepare(config, resume)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with (
            LocalCluster(config, run_dir) as cluster,
            MetricsWriter(run_dir / "metrics.csv", append=resume) as writer,
            ProgressDisplay(total_steps=total_steps, num_workers=config.num_workers) as progress,
            TensorBoardLog(run_dir) as tensorboard,
        ):
            cluster.on_fault = lambda fault: progress.message(_describe_fault(fault))
            cluster.start_shards()
            cluster.start_evaluator()
            cluster.start_workers()
            poller = ShardStatsPoller(cluster.addresses, security=cluster.security)
            _supervise(cluster, _Router(writer, progress, tensorboard, poller))
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
                faults=cluster.faults,
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


def _describe_fault(fault: Fault) -> str:
    text = f"{fault.process} died (exit code {fault.exitcode}); {fault.action}"
    if fault.version_before is not None:
        text += f"; it had applied {fault.version_before} updates"
    return text


def _summary_json(result: RunResult) -> str:
    return json.dumps(
        {
            "final": result.final,
            "worker_steps": result.worker_steps,
            "elapsed_s": round(result.elapsed_s, 3),
            "faults": [
                {**dataclasses.asdict(fault), "lost_updates": fault.lost_updates}
                for fault in result.faults
            ],
        },
        indent=2,
    )
