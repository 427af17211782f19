"""Downpour SGD vs DistributedDataParallel (gloo) vs one-process SGD: LeNet on digits, 2 workers,
time to a target test accuracy, each with and without a straggler, in one invocation.

Owns the DDP and SGD training loops, the straggler, the timing and the md/json/png report.
Downpour runs twice: through the library launcher (``train``), and as shards (``serve_shard``)
plus the library's worker loop (``run_worker``) with the straggler as its step hook, in a pool
of warm processes. Binds 127.0.0.1 only; every process it starts is stopped on the way out.

Straggler: worker (rank) 1 sleeps twice the compute time it measured for each step, right after
that step, so each of its steps takes 3x; one-process SGD sleeps the same way (the whole job is
the straggler). Time runs from the moment all workers start training (processes already up);
parameters are snapshotted every 50 ms and evaluated after training, so evaluation costs no
training time (the launcher's run keeps its live evaluator).

At ~850 lines this is over the 600-line mark: the comparison has to live in this one file,
in marked sections (shared loop, process pool, DDP, SGD, Downpour, summary, report, CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import functools
import itertools
import json
import logging
import os
import queue as queue_module
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import machine
from distbelief.client import ParameterServerClient
from distbelief.config import JobConfig
from distbelief.data import ArrayDataset, load_dataset, worker_indices
from distbelief.errors import LauncherInterrupted
from distbelief.evaluator import evaluate
from distbelief.files import write_file_atomic
from distbelief.launch import train
from distbelief.server.optimizers import server_optimizer_from_config
from distbelief.server.process import serve_shard
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.telemetry import read_metrics
from distbelief.worker import StepInfo, build_replica, run_worker, worker_batches

logger = logging.getLogger("compare_ddp")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STRAGGLER_RANK = 1
STRAGGLER_SLOWDOWN = 3.0
"""The straggler sleeps (slowdown - 1) x each step's measured compute time after that step."""
SNAPSHOT_EVERY_S = 0.05
"""Parameters are copied this often during training and evaluated on the test set afterwards."""
LAUNCHER_EVAL_EVERY_S = 0.1
"""The launcher's live evaluator period: it evaluates while training (~20 ms a time, on the
same 2 cores), so this row shows the job as a user runs it, evaluation cost included."""
RUN_TIMEOUT_S = 180.0
"""Longest one run may take before it is stopped as hung."""
STOP_GRACE_S = 5.0
POOL_SIZE = 4
"""Processes in the pool: enough for 2 shards and 2 workers."""
METHODS = ("ddp", "downpour_launcher", "downpour_own", "sgd")
LABELS = {
    "ddp": "DDP (gloo, 2 ranks)",
    "downpour_launcher": "Downpour, library launcher",
    "downpour_own": "Downpour, worker loop in the pool",
    "sgd": "SGD, 1 process",
}
COLORS = {"ddp": "tab:blue", "downpour_launcher": "tab:orange", "downpour_own": "tab:red"}
COLORS["sgd"] = "0.35"
DPI = 110


@dataclass(frozen=True, kw_only=True, slots=True)
class Setup:
    """What every method of one comparison shares."""

    epochs: int
    """Passes over each worker's slice (one process: over the whole training set)."""
    lr: float
    """Learning rate of SGD, of Downpour's workers and of Downpour's shards."""
    ddp_lr: float
    """DDP's rate: it averages 2 x batch_size samples per update, so by the linear scaling rule
    it gets num_workers x lr for the same step size per sample."""
    batch_size: int = 32
    num_workers: int = 2
    num_shards: int = 2
    seed: int = 0
    slowdown: float = 1.0
    """The straggler's slowdown (1: none)."""
    timeout_s: float = 60.0


# ---------------------------------------------------------------- shared by every training loop


def epoch_batches(data: ArrayDataset, indices: torch.Tensor, setup: Setup) -> Iterator:
    """The batches of ``indices`` in the order a Downpour worker visits them."""
    return worker_batches(downpour_config(setup), data, indices)


class Snapshots:
    """Copies of the parameters every ``every_s`` seconds, timed from ``start``, each with the
    number of training samples its parameters have seen. Copying LeNet takes tens of
    microseconds; evaluating them waits until training is over."""

    def __init__(self, start: float, every_s: float = SNAPSHOT_EVERY_S) -> None:
        self.start, self.every_s = start, every_s
        self.taken: list[tuple[float, int, list[torch.Tensor]]] = []

    def take(self, tensors, samples: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.taken.append((now - self.start, samples, [t.detach().clone() for t in tensors]))

    def maybe_take(self, tensors, samples: int) -> None:
        now = time.time()
        if not self.taken or now - self.start - self.taken[-1][0] >= self.every_s:
            self.take(tensors, samples, now)

    def curve(self, model: nn.Module, test_set: ArrayDataset) -> list[list[float]]:
        """[time_s, test_accuracy, test_loss, samples] of every snapshot, loaded into ``model``."""
        rows = []
        for time_s, samples, tensors in self.taken:
            with torch.no_grad():
                for param, value in zip(model.parameters(), tensors, strict=True):
                    param.copy_(value.view_as(param))
            loss, accuracy = evaluate(model, test_set)
            rows.append([round(time_s, 3), accuracy, loss, samples])
        return rows


class Straggler:
    """A worker-loop step hook: after each step it sleeps (slowdown - 1) x the compute time that
    step measured, so each step takes slowdown x (slowdown 1: no sleep); it counts steps,
    compute and sleep either way."""

    def __init__(self, slowdown: float) -> None:
        self.slowdown = slowdown
        self.num_steps, self.compute_s, self.slept_s = 0, 0.0, 0.0

    def after_step(self, step: StepInfo) -> None:
        if self.slowdown > 1.0:
            pause_s = (self.slowdown - 1.0) * step.compute_s
            time.sleep(pause_s)
            self.slept_s += pause_s
        self.num_steps, self.compute_s = self.num_steps + 1, self.compute_s + step.compute_s

    def stats(self) -> dict:
        return {"steps": self.num_steps, "compute_s": self.compute_s, "slept_s": self.slept_s}


def train_steps(model, optimizer, batches, slowdown: float, on_step: Callable[[int], None]) -> dict:
    """DDP's and SGD's loop: forward, backward, step for each batch, then the same Straggler
    as the Downpour workers' hook, then ``on_step``."""
    straggler = Straggler(slowdown)
    for images, labels in batches:
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        compute_s = time.perf_counter() - started
        straggler.after_step(
            StepInfo(
                step=straggler.num_steps + 1,
                loss=loss.item(),
                batch_size=len(labels),
                compute_s=compute_s,
                time=time.time(),
            )
        )
        on_step(straggler.num_steps)
    return straggler.stats()


@functools.cache
def load_data() -> tuple[ArrayDataset, ArrayDataset]:
    """The digits train and test splits (cached: a pool process loads them once)."""
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


def replica(setup: Setup) -> nn.Module:
    """The model every method starts from: LeNet built as roles does, with the run's seed."""
    train_set = load_data()[0]
    return build_replica(downpour_config(setup), train_set.input_shape, train_set.num_classes)


def downpour_config(setup: Setup, out_dir: str = "") -> JobConfig:
    return JobConfig.from_fields(
        {
            "model.name": "lenet",
            "data.name": "digits",
            "cluster.num_workers": setup.num_workers,
            "cluster.num_shards": setup.num_shards,
            "optimizer.lr": setup.lr,
            "server.lr": setup.lr,
            "optimizer.batch_size": setup.batch_size,
            "optimizer.epochs": setup.epochs,
            "model.seed": setup.seed,
            "reporting.out_dir": out_dir,
            "reporting.eval_every_s": LAUNCHER_EVAL_EVERY_S,
            "faults.timeout_s": setup.timeout_s,
        }
    )


# ---------------------------------------------------------------- the process pool


@dataclass(frozen=True, slots=True)
class Slot:
    """What a pool process's task gets besides its arguments."""

    report: Callable[[str, object], None]
    """report(kind, payload): to the pool's queue, under the task's name."""
    stop: Any
    """The pool's shard stop flag (an Event shared with every pool process at spawn)."""
    barrier: Any
    """A Barrier of NUM_WORKERS parties, shared at spawn, reused by every run."""


class Pool:
    """POOL_SIZE spawned processes that run one task at a time each. They import torch and
    load the data once, so every run starts on warm processes: on the 2 busy cores this was
    built on, spawning 4 fresh ones cost 10-30 s per run. Leaving the context stops them."""

    def __init__(self, num_workers: int) -> None:
        ctx = tmp.get_context("spawn")
        self.queue = ctx.Queue()
        self.stop = ctx.Event()
        self.inboxes = [ctx.Queue() for _ in range(POOL_SIZE)]
        # Kept on self: freed here, its shared memory would be reused (the launcher's stop
        # flags landed on it) while the pool processes still use it.
        self.barrier = ctx.Barrier(num_workers)
        self.processes = [
            ctx.Process(
                target=_slot_main,
                args=(inbox, self.queue, self.stop, self.barrier),
                name=f"pool{i}",
                daemon=True,
            )
            for i, inbox in enumerate(self.inboxes)
        ]
        self.received: list[tuple[str, str, object]] = []
        for process in self.processes:
            process.start()
        try:  # warm-up must not overlap the first run's timing
            self.wait_for("warm", POOL_SIZE, "pool")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        machine.close_process_pool(self.inboxes, self.processes, STOP_GRACE_S)

    def submit(self, slot: int, name: str, task: Callable, *args) -> None:
        """Run ``task(Slot, *args)`` in pool process ``slot``; its reports carry ``name``."""
        self.inboxes[slot].put((name, task, args))

    def pump(self, timeout_s: float) -> None:
        """Read one report (waiting up to ``timeout_s``); raise on a task's error or death."""
        with contextlib.suppress(queue_module.Empty):
            self.received.append(self.queue.get(timeout=max(0.0, timeout_s)))
        for kind, name, payload in self.received:
            if kind == "error":
                raise RuntimeError(f"{name} failed:\n{payload}")
        for process in self.processes:
            if process.exitcode is not None:
                raise RuntimeError(f"{process.name} exited with code {process.exitcode}")

    def reports(self, kind: str, prefix: str) -> dict[str, object]:
        return {n: p for k, n, p in self.received if k == kind and n.startswith(prefix)}

    def wait_for(self, kind: str, count: int, prefix: str) -> dict[str, object]:
        """``count`` reports of ``kind`` from tasks named ``prefix``...

        Raises:
            RuntimeError: a task failed or a pool process died.
            TimeoutError: they did not all come within RUN_TIMEOUT_S.
        """
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(self.reports(kind, prefix)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{prefix}: no {count} {kind!r} reports in {RUN_TIMEOUT_S:g}s")
            self.pump(0.2)
        return self.reports(kind, prefix)


def _watch_parent(parent_pid: int) -> None:
    # A parent killed with SIGKILL cannot stop its pool: the pool notices and leaves by itself.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(3)


def _slot_main(inbox, queue, stop, barrier) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format="[pool] %(levelname)s %(message)s")
    torch.set_num_threads(1)
    load_data()
    queue.put(("warm", tmp.current_process().name, None))
    while (task := inbox.get()) is not None:
        name, target, args = task

        def report(kind: str, payload: object, name: str = name) -> None:
            queue.put((kind, name, payload))

        # A task hung past the run's limit prints every thread's stack before it is stopped.
        faulthandler.dump_traceback_later(RUN_TIMEOUT_S - STOP_GRACE_S)
        try:
            target(Slot(report, stop, barrier), *args)
        except Exception:
            report("error", traceback.format_exc())
        finally:
            faulthandler.cancel_dump_traceback_later()


def free_port() -> int:
    """A port free on 127.0.0.1 now (another process could take it before gloo binds it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_interface() -> str:
    """The loopback interface's name, for GLOO_SOCKET_IFNAME (gloo then binds 127.0.0.1)."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def _nothing(_num_steps: int) -> None:
    pass


def combine(done: dict, evaluating: str) -> dict:
    """One row from each process's report: the curve of ``evaluating``, per-process stats."""
    return {
        "curve": done[evaluating]["curve"],
        "train_s": max(d["train_s"] for d in done.values()),
        "steps": {name.split("/")[-1]: d["steps"] for name, d in sorted(done.items())},
        "slept_s": round(sum(d["slept_s"] for d in done.values()), 3),
    }


# ---------------------------------------------------------------- (a) DDP


def _ddp_rank(slot: Slot, rank: int, setup: Setup, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=setup.num_workers,
        timeout=datetime.timedelta(seconds=setup.timeout_s),
    )
    try:
        train_set, test_set = load_data()
        model = replica(setup)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=setup.ddp_lr)
        indices = worker_indices(len(train_set), rank, setup.num_workers, seed=setup.seed)
        # Every rank must run as many steps as the smallest slice gives, or allreduce hangs.
        steps = len(train_set) // setup.num_workers // setup.batch_size * setup.epochs
        batches = itertools.islice(epoch_batches(train_set, indices, setup), steps)
        slowdown = setup.slowdown if rank == STRAGGLER_RANK else 1.0
        dist.barrier()
        start = time.time()
        snapshots = Snapshots(start)
        snapshots.take(model.parameters(), 0)
        samples_per_step = setup.batch_size * setup.num_workers

        def on_step(num_steps: int) -> None:
            snapshots.maybe_take(model.parameters(), num_steps * samples_per_step)

        stats = train_steps(ddp, optimizer, batches, slowdown, on_step if rank == 0 else _nothing)
        stats["train_s"] = time.time() - start
        snapshots.take(model.parameters(), stats["steps"] * samples_per_step)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        stats["curve"] = snapshots.curve(model, test_set)
    slot.report("done", stats)


def run_ddp(pool: Pool, setup: Setup, name: str) -> dict:
    port = free_port()
    for rank in range(setup.num_workers):
        pool.submit(rank, f"{name}/rank{rank}", _ddp_rank, rank, setup, port)
    return combine(pool.wait_for("done", setup.num_workers, f"{name}/"), f"{name}/rank0")


# ---------------------------------------------------------------- (c) one-process SGD


def _sgd_process(slot: Slot, setup: Setup) -> None:
    train_set, test_set = load_data()
    model = replica(setup)
    optimizer = torch.optim.SGD(model.parameters(), lr=setup.lr)
    indices = worker_indices(len(train_set), 0, 1, seed=setup.seed)
    start = time.time()
    snapshots = Snapshots(start)
    snapshots.take(model.parameters(), 0)

    def on_step(num_steps: int) -> None:
        snapshots.maybe_take(model.parameters(), num_steps * setup.batch_size)

    batches = epoch_batches(train_set, indices, setup)
    stats = train_steps(model, optimizer, batches, setup.slowdown, on_step)
    stats["train_s"] = time.time() - start
    snapshots.take(model.parameters(), stats["steps"] * setup.batch_size)
    stats["curve"] = snapshots.curve(model, test_set)
    slot.report("done", stats)


def run_sgd(pool: Pool, setup: Setup, name: str) -> dict:
    pool.submit(0, f"{name}/sgd", _sgd_process, setup)
    return combine(pool.wait_for("done", 1, f"{name}/"), f"{name}/sgd")


# ---------------------------------------------------------------- (b) Downpour


def run_downpour_launcher(setup: Setup, runs_dir: Path, name: str) -> dict:
    """The library's own job (no straggler possible); curve from the live evaluator's rows."""
    config = downpour_config(setup, out_dir=str(runs_dir / name))
    result = train(config)
    records = read_metrics(result.run_dir / "metrics.csv")
    curve = sorted(
        [
            round(r["time_s"], 3),
            r["test_accuracy"],
            r["test_loss"],
            r["version"] * config.optimizer.minibatch_size,
        ]
        for r in records
        if r["role"] == "evaluator" and r["test_accuracy"] is not None
    )
    worker_times = [r["time_s"] for r in records if r["role"] == "worker"]
    return {
        "curve": curve,
        "train_s": max(worker_times) if worker_times else None,
        "steps": {f"worker{k}": v for k, v in sorted(result.worker_steps.items())},
        "slept_s": 0.0,
        "run_dir": str(result.run_dir),
    }


def _shard_task(slot: Slot, shard_id: int, config: JobConfig) -> None:
    def emit(kind: str, payload: object) -> None:
        if kind == "ready":  # heartbeats are not needed here
            slot.report("ready", payload["address"])

    result = serve_shard(
        shard_id,
        config.cluster.num_shards,
        f"tcp://{config.cluster.host}:0",
        optimizer_factory=server_optimizer_from_config(config.server),
        consistency=config.consistency,
        num_workers=config.cluster.num_workers,
        security=None,
        emit=emit,
        stop=slot.stop,
    )
    slot.report("stopped", {"version": result["version"], "pushes": result["num_pushes"]})


def _downpour_worker(slot: Slot, rank: int, setup: Setup, addresses: list[str]) -> None:
    """The library's worker (``run_worker``) with the straggler as its step hook. Both workers
    take their first step together: the "started" report waits at the pool's barrier."""
    straggler = Straggler(setup.slowdown if rank == STRAGGLER_RANK else 1.0)

    def emit(kind: str, _payload: object) -> None:
        if kind == "started":  # sent right before the first step; metrics are not needed
            slot.barrier.wait(setup.timeout_s)
            slot.report("started", time.time())

    run_worker(downpour_config(setup), rank, addresses, emit=emit, hooks=[straggler])
    slot.report("done", {**straggler.stats(), "end": time.time()})


def run_downpour_own(pool: Pool, setup: Setup, name: str) -> dict:
    """Shards and workers in the pool; this process pulls the shards' parameters every
    SNAPSHOT_EVERY_S (as the launcher's evaluator would) and evaluates them afterwards."""
    config = downpour_config(setup)
    model = replica(setup)
    pool.stop.clear()
    for shard_id in range(setup.num_shards):
        pool.submit(shard_id, f"{name}/shard{shard_id}", _shard_task, shard_id, config)
    try:
        ready = pool.wait_for("ready", setup.num_shards, f"{name}/shard")
        addresses = [ready[f"{name}/shard{i}"] for i in range(setup.num_shards)]
        for rank in range(setup.num_workers):
            slot = setup.num_shards + rank
            pool.submit(slot, f"{name}/worker{rank}", _downpour_worker, rank, setup, addresses)
        snapshots = watch_shards(pool, model, config, addresses, name)
        done = pool.wait_for("done", setup.num_workers, f"{name}/worker")
    finally:
        pool.stop.set()
    pool.wait_for("stopped", setup.num_shards, f"{name}/shard")
    for stats in done.values():
        stats["train_s"] = stats.pop("end") - snapshots.start
    done[f"{name}/worker0"]["curve"] = snapshots.curve(model, load_data()[1])
    return combine(done, f"{name}/worker0")


def watch_shards(pool: Pool, model: nn.Module, config: JobConfig, addresses, name) -> Snapshots:
    """Connect as a reader (that waits until a worker has initialised the shards), then pull
    the shards' parameters every SNAPSHOT_EVERY_S from the workers' start until they are done."""
    layout = FlatLayout(tensor_specs(model.named_parameters()))
    flats = layout.allocate()
    client = ParameterServerClient(addresses, layout.specs, timeout_s=config.faults.timeout_s)
    try:
        client.handshake(None)
        started = pool.wait_for("started", config.cluster.num_workers, f"{name}/worker")
        snapshots = Snapshots(min(started.values()))
        while True:
            finished = len(pool.reports("done", f"{name}/worker")) == config.cluster.num_workers
            # n_push = 1: every update a shard applied is one worker step of batch_size samples.
            versions = client.wait(client.pull(flats))
            snapshots.take(layout.views(flats), max(versions) * config.optimizer.minibatch_size)
            if finished:
                return snapshots
            pool.pump(SNAPSHOT_EVERY_S)
    finally:
        client.close()


# ---------------------------------------------------------------- runs and their summary


def plan(repeats: int) -> list[tuple[int, str, bool]]:
    """(repeat, method, straggler) in run order: each repeat runs every pair once, back to back,
    so slow phases of a shared machine hit every method alike. The launcher has no straggler."""
    pairs = [(m, False) for m in METHODS] + [(m, True) for m in METHODS if m != "downpour_launcher"]
    return [(r, m, s) for r in range(repeats) for m, s in pairs]


def run_all(setup: Setup, repeats: int, runs_dir: Path) -> list[dict]:
    """Every run of ``plan``; a failed run becomes a row with its error (and a fresh pool)."""
    rows: list[dict] = []
    pool = None
    try:
        for repeat, method, straggler in plan(repeats):
            name = f"r{repeat}_{method}" + ("_straggler" if straggler else "")
            if pool is None and method != "downpour_launcher":
                pool = Pool(setup.num_workers)
            row = run_one(pool, setup, method, straggler, runs_dir, name)
            rows.append({"repeat": repeat, **row})
            if "error" in row and pool is not None:
                pool.close()  # a task of the failed run may still hang in a pool process
                pool = None
    finally:
        if pool is not None:
            pool.close()
    return rows


def run_one(pool, setup: Setup, method: str, straggler: bool, runs_dir: Path, name: str) -> dict:
    setup = replace(setup, slowdown=STRAGGLER_SLOWDOWN) if straggler else setup
    logger.info("run %s", name)
    started = time.monotonic()
    try:
        if method == "ddp":
            row = run_ddp(pool, setup, name)
        elif method == "sgd":
            row = run_sgd(pool, setup, name)
        elif method == "downpour_own":
            row = run_downpour_own(pool, setup, name)
        else:
            row = run_downpour_launcher(setup, runs_dir, name)
    except LauncherInterrupted:  # Ctrl-C or SIGTERM inside train(): stop everything
        raise
    except Exception as e:  # one failed run must not lose the others' results
        logger.error("run %s failed: %s", name, e)
        row = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"}
    return {"method": method, "straggler": straggler, **row, "wall_s": time.monotonic() - started}


def first_crossing(curve: list, target: float) -> list | None:
    """The first [time_s, accuracy, loss, samples] at or above ``target``."""
    return next((point for point in curve if point[1] >= target), None)


def summarize(rows: list[dict], target: float) -> list[dict]:
    """One line per (method, straggler): medians over repeats; "vs_ddp" is the median of the
    per-repeat ratios to that repeat's DDP run without a straggler, "vs_no_straggler" to that
    repeat's run of the same method without one."""
    for row in rows:
        curve = row.get("curve") or []
        crossing = first_crossing(curve, target)
        row["time_to_target_s"] = crossing[0] if crossing else None
        row["samples_to_target"] = crossing[3] if crossing else None
        row["final_acc"] = curve[-1][1] if curve else None
        row["best_acc"] = max((c[1] for c in curve), default=None)
    ddp = {
        r["repeat"]: r["time_to_target_s"]
        for r in rows
        if r["method"] == "ddp" and not r["straggler"]
    }
    alone = {(r["repeat"], r["method"]): r["time_to_target_s"] for r in rows if not r["straggler"]}
    keys = dict.fromkeys((r["method"], r["straggler"]) for r in rows)
    return [
        _summary_line([r for r in rows if (r["method"], r["straggler"]) == key], ddp, alone)
        for key in keys
    ]


def _summary_line(group: list[dict], ddp: dict, alone: dict) -> dict:
    method, straggler = group[0]["method"], group[0]["straggler"]
    times = [r["time_to_target_s"] for r in group]
    vs_alone = [_ratio(r["time_to_target_s"], alone.get((r["repeat"], method))) for r in group]
    return {
        "method": method,
        "straggler": straggler,
        "time_to_target_s": _median(times),
        "time_range_s": _range(times),
        "vs_ddp": _median([_ratio(r["time_to_target_s"], ddp.get(r["repeat"])) for r in group]),
        "vs_no_straggler": _median(vs_alone) if straggler else None,
        "samples_to_target": _median([r["samples_to_target"] for r in group]),
        "final_acc": _median([r["final_acc"] for r in group]),
        "best_acc": _median([r["best_acc"] for r in group]),
        "train_s": _median([r.get("train_s") for r in group]),
        "reached": sum(t is not None for t in times),
        "runs": len(group),
        "errors": [r["error"] for r in group if "error" in r],
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _range(values: list) -> list[float] | None:
    known = [v for v in values if v is not None]
    return [min(known), max(known)] if len(known) > 1 else None


# ---------------------------------------------------------------- report


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else spec.format(value)


def table(lines: list[dict], target: float) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        f"straggler (worker {STRAGGLER_RANK} {STRAGGLER_SLOWDOWN:g}x)",
        f"time to {target:g} (s)",
        "x DDP (no straggler)",
        "x same method, no straggler",
        f"samples to {target:g}",
        "final acc",
        "best acc",
        "training time (s)",
    ]
    cells = []
    for line in lines:
        time_text = _fmt(line["time_to_target_s"], "{:.2f}", "not reached")
        if line["time_range_s"]:
            time_text += " ({:.2f}-{:.2f})".format(*line["time_range_s"])
        if line["runs"] > 1:
            time_text += f", {line['reached']}/{line['runs']} reached"
        cells.append(
            [
                LABELS[line["method"]] + (" (failed)" if line["errors"] else ""),
                "yes" if line["straggler"] else "no",
                time_text,
                _fmt(line["vs_ddp"], "{:.2f}"),
                _fmt(line["vs_no_straggler"], "{:.2f}"),
                _fmt(line["samples_to_target"], "{:.0f}"),
                _fmt(line["final_acc"], "{:.3f}"),
                _fmt(line["best_acc"], "{:.3f}"),
                _fmt(line["train_s"], "{:.2f}"),
            ]
        )
    return header, cells


def write_report(stem: Path, record: dict, header: list[str], cells: list[list[str]]) -> str:
    """``<stem>.json`` and ``<stem>.md`` (unless stem is "-"); returns the markdown."""
    settings = record["settings"]
    description = (
        f"{settings['epochs']} epochs of each worker's slice (SGD: of the whole set), batch "
        f"{settings['batch_size']} per worker, lr {settings['lr']:g} (DDP {settings['ddp_lr']:g}),"
        f" seed {settings['seed']}; {settings['repeats']} repeat(s), medians (min-max)."
    )
    return machine.write_report(
        stem,
        record,
        "Downpour vs DDP vs one-process SGD: LeNet on digits, 2 workers",
        description,
        header,
        cells,
    )


def plot_curves(rows: list[dict], target: float, path: Path, title: str) -> None:
    """Test accuracy of the first repeat's runs vs time (top) and vs training samples
    (bottom); left without, right with the straggler."""
    figure = Figure(figsize=(13.0, 9.0), dpi=DPI)
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, 2, sharey=True)
    for column, straggler in enumerate((False, True)):
        runs = [r for r in rows if r["repeat"] == 0 and r["straggler"] == straggler]
        for axes, x_index in zip(panels[:, column], (0, 3), strict=True):
            _plot_panel(axes, runs, x_index, target)
        panels[0, column].set_title(
            f"worker {STRAGGLER_RANK} slowed {STRAGGLER_SLOWDOWN:g}x"
            if straggler
            else "no straggler",
            fontsize=11,
        )
        panels[0, column].set_xlabel("time since training started (s)")
        panels[1, column].set_xlabel("training samples used (all workers)")
    for axes in panels[:, 0]:
        axes.set_ylabel("test accuracy")
    figure.suptitle(title, fontsize=12)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    logger.info("wrote %s", path)


def _plot_panel(axes, runs: list[dict], x_index: int, target: float) -> None:
    """One line per run: curve column ``x_index`` (0 time, 3 samples) against accuracy."""
    for row in runs:
        if not row.get("curve"):
            continue
        xs = [point[x_index] for point in row["curve"]]
        label = LABELS[row["method"]]
        crossing = first_crossing(row["curve"], target)
        if crossing is not None:
            label += f": {target:g} at " + (
                f"{crossing[0]:.2f} s" if x_index == 0 else f"{crossing[3]} samples"
            )
        axes.plot(
            xs,
            [point[1] for point in row["curve"]],
            color=COLORS[row["method"]],
            marker="o",
            markersize=2.0,
            linewidth=1.5,
            label=label,
        )
    axes.axhline(target, color="black", linestyle=":", linewidth=1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlim(left=0.0)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")


# ---------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--epochs", type=machine.at_least(1), default=None, help="default 8 (--quick: 4)"
    )
    parser.add_argument("--target", type=float, default=0.9, help="test accuracy to reach")
    parser.add_argument(
        "--repeats", type=machine.at_least(1), default=None, help="default 3 (--quick: 1)"
    )
    parser.add_argument("--lr", type=machine.above_zero, default=0.05)
    parser.add_argument("--ddp-lr", type=machine.above_zero, default=None, help="default 2 x --lr")
    parser.add_argument("--seed", type=machine.seed, default=0)
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="file stem; - writes nothing"
    )
    parser.add_argument("--runs-dir", type=Path, default=None, help="launcher runs (default tmp)")
    parser.add_argument("--quick", action="store_true", help="4 epochs, 1 repeat; no results")
    parser.add_argument(
        "--replot",
        type=machine.record_file("compare_ddp"),
        default=None,
        help="redraw the PNG of a JSON",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.target <= 1.0:
        parser.error(f"argument --target: must be a test accuracy in (0, 1], got {args.target}")
    if args.epochs is None:
        args.epochs = 4 if args.quick else 8
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.ddp_lr = args.ddp_lr if args.ddp_lr is not None else 2 * args.lr
    if args.out is None:
        date = datetime.date.today().strftime("%Y%m%d")
        args.out = (
            Path("-") if args.quick else RESULTS_DIR / f"compare_ddp_cpu{os.cpu_count()}_{date}"
        )
    return args


def plot_title(record: dict) -> str:
    settings = record["settings"]
    return (
        f"LeNet on digits, {settings['num_workers']} workers, {settings['epochs']} epochs, "
        f"{record['cpu_count']} CPUs (repeat 1 of {settings['repeats']})"
    )


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process started here.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    args = parse_args(argv)
    if args.replot is not None:
        record = json.loads(args.replot.read_text())
        target = record["settings"]["target"]
        plot_curves(record["runs"], target, args.replot.with_suffix(".png"), plot_title(record))
        return 0
    setup = Setup(epochs=args.epochs, lr=args.lr, ddp_lr=args.ddp_lr, seed=args.seed)
    with contextlib.ExitStack() as stack:
        runs_dir = args.runs_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        rows = run_all(setup, args.repeats, runs_dir)
    lines = summarize(rows, args.target)
    settings = {**asdict(setup), "repeats": args.repeats, "target": args.target}
    settings |= {"straggler_rank": STRAGGLER_RANK, "straggler_slowdown": STRAGGLER_SLOWDOWN}
    settings |= {
        "snapshot_every_s": SNAPSHOT_EVERY_S,
        "launcher_eval_every_s": LAUNCHER_EVAL_EVERY_S,
    }
    record = {"benchmark": "compare_ddp", **machine.environment(), "settings": settings}
    record |= {"summary": lines, "runs": rows}
    print(write_report(args.out, record, *table(lines, args.target)))
    if str(args.out) != "-":
        plot_curves(rows, args.target, args.out.with_suffix(".png"), plot_title(record))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
