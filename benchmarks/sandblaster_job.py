"""Sandblaster evaluations on warm processes, for the Sandblaster benchmarks: shard servers in
``ServerHost`` processes, worker processes that run the library's worker loop
(``run_sandblaster_worker``) once per session, and the coordinator's service
(``CoordinatorService``) in the calling process, where it can be timed.

A session is one coordinator: its batch plan, its backup rule, the workers connected to it, and
the evaluations or L-BFGS iterations run through it. Worker processes import torch and load the
data once and serve session after session. Binds 127.0.0.1 only; every process started here is
stopped on the way out (and leaves by itself when its parent dies).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import os
import queue as queue_module
import signal
import threading
import time
import traceback
from dataclasses import dataclass

import torch
from torch import nn

import machine
from distbelief.client import ParameterServerClient
from distbelief.client.vectors import ShardVectors
from distbelief.coordinator import BatchPlan, CoordinatorService, EvaluationOutcome
from distbelief.data import ArrayDataset, load_dataset
from distbelief.models import build_model
from distbelief.optim.sandblaster import PortionInfo, add_portion_gradient, run_sandblaster_worker
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire import serve
from distbelief.wire.vector_program import Program
from server_host import ServerHost

logger = logging.getLogger("sandblaster_job")

DATASET = "digits"
TIMEOUT_S = 60.0
"""Limit of every blocking call; only a hung run ever waits this long."""
START_TIMEOUT_S = 180.0
"""Longest wait for the worker processes to import torch and load the data."""
STOP_GRACE_S = 5.0


def start_vector_shard(shard_id: int, num_shards: int):
    """A new, empty shard (it serves vector programs, bundles and reads) on a free port."""
    shard = ParameterShard(shard_id, num_shards, server_optimizer_factory("sgd", lr=0.0))
    return serve("tcp://127.0.0.1:0", ShardService(shard))


@functools.cache
def train_set() -> ArrayDataset:
    return load_dataset(DATASET, split="train")


def seeded_model(name: str, seed: int) -> nn.Module:
    """The model every session of ``name`` starts from (the shards are initialised with it)."""
    torch.manual_seed(seed)
    return build_model(name, train_set().input_shape, train_set().num_classes)


def batch_gradient_s(model: nn.Module, plan: BatchPlan, repeats: int = 3) -> float:
    """The fastest of ``repeats`` computations of the whole batch's gradient in this process
    with one thread, as a worker computes a portion: the reference for the evaluations."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grads = [torch.zeros_like(p) for p in model.parameters()]
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            add_portion_gradient(model, train_set(), plan.indices(), grads)
            times.append(time.perf_counter() - started)
        return min(times)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- worker processes


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerOrders:
    """What one worker does in one session."""

    coordinator: str
    shards: list[str]
    model: str
    slowdown: float = 1.0
    """After each portion the worker sleeps (slowdown - 1) x that portion's compute time."""
    portions_per_push: int = 2


class PortionLog:
    """The ``after_portion`` hook: slows the worker down and logs every portion it computed
    as ``[evaluation, portion, backup, num_examples, compute_s, slept_s, computed_at]``
    (``computed_at``: the wall-clock time its computation ended, before the sleep)."""

    def __init__(self, slowdown: float) -> None:
        self.slowdown = slowdown
        self.rows: list[list] = []

    def __call__(self, info: PortionInfo) -> None:
        computed_at = time.time()
        slept_s = 0.0
        if self.slowdown > 1.0:
            slept_s = (self.slowdown - 1.0) * info.compute_s
            time.sleep(slept_s)
        self.rows.append(
            [
                info.evaluation,
                info.portion,
                info.backup,
                info.num_examples,
                info.compute_s,
                slept_s,
                computed_at,
            ]
        )


def _watch_parent(parent_pid: int) -> None:
    # A parent killed with SIGKILL cannot stop its workers: they notice and leave by themselves.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(3)


def _worker_main(rank: int, inbox, outbox) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format=f"[worker{rank}] %(levelname)s %(message)s")
    torch.set_num_threads(1)
    dataset = load_dataset(DATASET, split="train")
    outbox.put(("warm", rank, None))
    while (orders := inbox.get()) is not None:
        log = PortionLog(orders.slowdown)
        try:
            model = build_model(orders.model, dataset.input_shape, dataset.num_classes)
            figures = run_sandblaster_worker(
                model,
                dataset,
                rank,
                orders.coordinator,
                orders.shards,
                timeout_s=TIMEOUT_S,
                retry_timeout_s=TIMEOUT_S,
                portions_per_push=orders.portions_per_push,
                after_portion=log,
            )
            outbox.put(("done", rank, {"figures": figures, "portions": log.rows}))
        except Exception:
            outbox.put(("error", rank, traceback.format_exc()))


class WorkerPool:
    """``num_workers`` spawned worker processes, warm (torch imported, data loaded) once the
    constructor returns. A context manager."""

    def __init__(self, num_workers: int) -> None:
        context = mp.get_context("spawn")
        self.num_workers = num_workers
        self.outbox = context.Queue()
        self.inboxes = [context.Queue() for _ in range(num_workers)]
        self.processes = [
            context.Process(
                target=_worker_main, args=(rank, inbox, self.outbox), name=f"worker{rank}"
            )
            for rank, inbox in enumerate(self.inboxes)
        ]
        for process in self.processes:
            process.daemon = True
            process.start()
        try:
            self.collect("warm", START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def send(self, orders: list[WorkerOrders]) -> None:
        for inbox, order in zip(self.inboxes, orders, strict=True):
            inbox.put(order)

    def collect(self, kind: str, timeout_s: float = TIMEOUT_S) -> dict[int, object]:
        """One ``kind`` report from every worker, by rank.

        Raises:
            RuntimeError: a worker's session failed, or a worker process died.
            TimeoutError: not every worker reported within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        reports: dict[int, object] = {}
        while len(reports) < self.num_workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(reports)} of {self.num_workers} {kind!r} reports")
            with contextlib.suppress(queue_module.Empty):
                got, rank, payload = self.outbox.get(timeout=0.2)
                if got == "error":
                    raise RuntimeError(f"worker{rank} failed:\n{payload}")
                if got == kind:
                    reports[rank] = payload
            for process in self.processes:
                if process.exitcode is not None:
                    raise RuntimeError(f"{process.name} exited with code {process.exitcode}")
        return reports

    def close(self) -> None:
        machine.close_process_pool(self.inboxes, self.processes, STOP_GRACE_S)


class ShardHosts:
    """One ``ServerHost`` process per shard; ``start()`` gives a set of new, empty shards."""

    def __init__(self, num_shards: int) -> None:
        self.hosts = [
            ServerHost(start_vector_shard, shard_id, num_shards, name=f"shard{shard_id}")
            for shard_id in range(num_shards)
        ]

    def __enter__(self) -> ShardHosts:
        return self

    def __exit__(self, *exc_info) -> None:
        for host in self.hosts:
            host.close()

    def start(self) -> list[str]:
        return [host.start_server() for host in self.hosts]


# ---------------------------------------------------------------- the coordinator's side


class TimedVectors:
    """``ShardVectors.run`` with its calls counted and timed (L-BFGS's ``VectorSpace``)."""

    def __init__(self, vectors: ShardVectors) -> None:
        self.vectors = vectors
        self.calls = 0
        self.instructions = 0
        self.seconds = 0.0

    def run(self, program: Program) -> list:
        started = time.perf_counter()
        try:
            return self.vectors.run(program)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1
            self.instructions += len(program)


class Session:
    """A coordinator (its service served on 127.0.0.1) over ``shards`` and the pool's workers.

    Args:
        pool: The workers; each gets ``WorkerOrders`` for this session.
        shards: Shard addresses; initialised with ``initial``'s values if they are empty.
        initial: The model whose layout (and, on empty shards, values) the job uses.
        model: Its name, for the workers.
        plan: The batch and its portions.
        max_holders: 1 (no backup copies) or more.
        slowdowns: Per worker rank (default: none slowed).
        portions_per_push: The workers' push cadence.
    """

    def __init__(
        self,
        pool: WorkerPool,
        shards: list[str],
        initial: nn.Module,
        model: str,
        plan: BatchPlan,
        *,
        max_holders: int,
        slowdowns: dict[int, float] | None = None,
        portions_per_push: int = 2,
    ) -> None:
        specs = tensor_specs(initial.named_parameters())
        self.layout = FlatLayout(specs)
        self.client = ParameterServerClient(shards, specs, timeout_s=TIMEOUT_S)
        self.client.handshake(self.layout.flatten(list(initial.parameters())))
        self.vectors = ShardVectors(self.client)
        self.timed = TimedVectors(self.vectors)
        self.commits = 0
        self.commit_s = 0.0
        self.service = CoordinatorService(plan, self._commit, max_holders=max_holders)
        self.server = serve("tcp://127.0.0.1:0", self.service)
        self.pool = pool
        slowdowns = slowdowns or {}
        pool.send(
            [
                WorkerOrders(
                    coordinator=self.server.address,
                    shards=shards,
                    model=model,
                    slowdown=slowdowns.get(rank, 1.0),
                    portions_per_push=portions_per_push,
                )
                for rank in range(pool.num_workers)
            ]
        )
        self.results: dict[int, dict] = {}
        self._closed = False
        try:
            # Every worker takes part from the start of the first evaluation.
            deadline = time.monotonic() + TIMEOUT_S
            while self.service.num_connections < pool.num_workers:
                if time.monotonic() > deadline:
                    raise TimeoutError("the workers did not connect")
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise

    def _commit(self, evaluation: int, bundle: str) -> None:
        started = time.perf_counter()
        program = Program()
        program.commit(evaluation, bundle)
        self.vectors.run(program)
        self.commit_s += time.perf_counter() - started
        self.commits += 1

    def evaluate(
        self, evaluation: int, point: str = "param"
    ) -> tuple[EvaluationOutcome, float, float]:
        """The batch gradient at ``point`` into a new vector, dropped afterwards; returns the
        outcome, the seconds from opening the evaluation on the shards to closing it, and the
        wall-clock time it was opened."""
        opened_at = time.time()
        started = time.perf_counter()
        program = Program()
        program.open_evaluation(evaluation, f"eval{evaluation}")
        self.vectors.run(program)
        outcome = self.service.evaluate(evaluation, point, TIMEOUT_S)
        program = Program()
        program.close_evaluation(evaluation)
        program.drop(f"eval{evaluation}")
        self.vectors.run(program)
        return outcome, time.perf_counter() - started, opened_at

    def lbfgs_evaluate(self, evaluation: int, point: str) -> EvaluationOutcome:
        """The ``evaluate`` callable ``SandblasterLBFGS`` takes."""
        return self.service.evaluate(evaluation, point, TIMEOUT_S)

    def close(self) -> dict[int, dict]:
        """Tell the workers to stop; returns each one's figures and portion log, by rank."""
        if not self._closed:
            self._closed = True
            try:
                self.service.finish(TIMEOUT_S)
                self.results = {
                    rank: dict(payload) for rank, payload in self.pool.collect("done").items()
                }
            finally:
                self.server.stop()
                self.client.close(wait=False)
        return self.results

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def portion_rows(results: dict[int, dict]) -> list[dict]:
    """Every portion the workers computed, as dicts with their rank."""
    keys = ("evaluation", "portion", "backup", "num_examples", "compute_s", "slept_s")
    keys += ("computed_at",)
    return [
        {"rank": rank, **dict(zip(keys, row, strict=True))}
        for rank, result in sorted(results.items())
        for row in result["portions"]
    ]
