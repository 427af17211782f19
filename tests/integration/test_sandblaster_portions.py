"""Sandblaster evaluations for real: two shard processes, the coordinator's service in the test
process, three worker processes on a float64 model and the digits data set. Whatever the
workers do (finish in any order, get SIGKILLed mid-evaluation, race backup copies of a slow
one), the shards' committed gradient sum is the full batch's, each portion counted once."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.client.vectors import ShardVectors
from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.service import CoordinatorService
from distbelief.data import load_dataset
from distbelief.models import MLP
from distbelief.optim.sandblaster import PortionInfo, run_sandblaster_worker
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire import serve
from distbelief.wire.vector_program import Program

NUM_WORKERS = 3
NUM_PORTIONS = 15
BATCH_SIZE = 900
TIMEOUT_S = 60.0
"""Limits of blocking calls; only failing runs ever wait this long."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MLP((1, 32, 32), 10, hidden_sizes=(16,)).double()


class SlowPortions:
    """After each portion, sleep ``sleep_s``; after the ``stall_after``-th, create ``marker``
    and stall (until killed), or without ``stall_after`` create it after the first portion.
    With ``wait_for``, first wait until that file exists (for at most TIMEOUT_S): until
    another worker got where the test needs it, however late a busy machine runs it."""

    def __init__(
        self, sleep_s: float, marker: str = "", stall_after: int = 0, wait_for: str = ""
    ) -> None:
        self.sleep_s, self.marker, self.stall_after = sleep_s, marker, stall_after
        self.wait_for = wait_for
        self.count = 0

    def __call__(self, info: PortionInfo) -> None:
        self.count += 1
        if self.marker and self.count == (self.stall_after or 1):
            Path(self.marker).touch()
        if self.count == self.stall_after:
            time.sleep(TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while self.wait_for and not Path(self.wait_for).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(self.sleep_s)


def _worker_main(
    rank: int, coordinator: str, shards: list[str], portions_per_push: int, hook
) -> None:
    torch.set_num_threads(1)
    dataset = load_dataset("digits", split="train")
    run_sandblaster_worker(
        _model(),
        dataset,
        rank,
        coordinator,
        shards,
        timeout_s=TIMEOUT_S,
        portions_per_push=portions_per_push,
        micro_batch_size=100,
        after_portion=hook,
    )


class Job:
    """Initialised shards, the coordinator's service on a real socket, worker processes."""

    def __init__(self, addresses: list[str]) -> None:
        self.model = _model()
        specs = tensor_specs(self.model.named_parameters())
        self.client = ParameterServerClient(addresses, specs, timeout_s=TIMEOUT_S)
        self.layout = FlatLayout(specs)
        self.client.handshake(self.layout.flatten(list(self.model.parameters())))
        self.vectors = ShardVectors(self.client)
        self.addresses = addresses
        self.dataset = load_dataset("digits", split="train")
        self.plan = BatchPlan(
            num_examples=len(self.dataset), num_portions=NUM_PORTIONS, batch_size=BATCH_SIZE
        )
        self.service = CoordinatorService(self.plan, self._commit, max_wait_s=1.0)
        self.server = serve("tcp://127.0.0.1:0", self.service)
        self.processes: list[mp.Process] = []

    def _commit(self, evaluation: int, bundle: str) -> None:
        program = Program()
        program.commit(evaluation, bundle)
        self.vectors.run(program)

    def start_workers(self, hooks: dict[int, SlowPortions], portions_per_push: int = 2) -> None:
        context = mp.get_context("spawn")
        for rank in range(NUM_WORKERS):
            args = (rank, self.server.address, self.addresses, portions_per_push, hooks.get(rank))
            process = context.Process(target=_worker_main, args=args, name=f"worker{rank}")
            process.start()
            self.processes.append(process)
        # Every worker takes part from the start of the first evaluation.
        deadline = time.monotonic() + TIMEOUT_S
        while self.service.num_connections < NUM_WORKERS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.service.num_connections == NUM_WORKERS, "the workers did not connect"

    def evaluate(self, evaluation: int):
        program = Program()
        program.open_evaluation(evaluation, f"g{evaluation}")
        self.vectors.run(program)
        outcome = self.service.evaluate(evaluation, "param", TIMEOUT_S)
        program = Program()
        program.close_evaluation(evaluation)
        self.vectors.run(program)
        gradient = self.layout.allocate()
        self.vectors.read(f"g{evaluation}", gradient)
        return outcome, gradient[torch.float64]

    def expected(self) -> tuple[float, torch.Tensor]:
        indices = self.plan.indices()
        images = self.dataset.images[indices].double()
        loss = nn.functional.cross_entropy(
            self.model(images), self.dataset.labels[indices], reduction="sum"
        )
        grads = torch.autograd.grad(loss, list(self.model.parameters()))
        return loss.item(), torch.cat([g.flatten() for g in grads])

    def check(self, outcome, gradient: torch.Tensor) -> None:
        loss_sum, expected = self.expected()
        assert outcome.num_examples == BATCH_SIZE
        assert outcome.loss_sum == pytest.approx(loss_sum, rel=1e-9)
        scale = float(expected.abs().max())
        assert torch.allclose(gradient, expected, rtol=1e-9, atol=1e-9 * scale)
        assert sum(outcome.figures.portions_by_worker.values()) == NUM_PORTIONS

    def finish(self, exited: int = NUM_WORKERS) -> None:
        self.service.finish(timeout_s=TIMEOUT_S)
        for process in self.processes:
            process.join(TIMEOUT_S)
        assert sorted(p.exitcode for p in self.processes).count(0) == exited

    def close(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(TIMEOUT_S)
        self.server.stop()
        self.client.close(wait=False)


@pytest.fixture
def job(shard_cluster):
    started = Job(shard_cluster(2))
    yield started
    started.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_three_workers_commit_the_full_batch_gradient_once(job):
    job.start_workers({})
    for evaluation in (1, 2):
        outcome, gradient = job.evaluate(evaluation)
        job.check(outcome, gradient)
    job.finish()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_worker_killed_mid_evaluation_changes_nothing(job, tmp_path):
    marker = tmp_path / "victim-busy"
    # The victim pushes rarely and stalls in its second portion: when killed it holds an
    # accepted portion no shard has counted, and one assigned. The others hold after each
    # portion until it has both (and then go slowly).
    victim = SlowPortions(sleep_s=0.0, marker=str(marker), stall_after=2)
    steady = SlowPortions(sleep_s=0.3, wait_for=str(marker))
    job.start_workers({0: steady, 1: steady, 2: victim}, portions_per_push=50)
    outcomes: list = []
    evaluating = threading.Thread(target=lambda: outcomes.append(job.evaluate(1)))
    evaluating.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists() and time.monotonic() < deadline and evaluating.is_alive():
        time.sleep(0.05)
    assert marker.exists(), "the victim never computed two portions"
    os.kill(job.processes[2].pid, signal.SIGKILL)
    evaluating.join(TIMEOUT_S)
    outcome, gradient = outcomes.pop()
    job.check(outcome, gradient)
    assert outcome.figures.reassigned >= 1
    assert not any(w.startswith("worker2-") for w in outcome.figures.portions_by_worker)
    job.finish(exited=NUM_WORKERS - 1)
    assert job.processes[2].exitcode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_backups_racing_a_slow_worker_change_nothing(job, tmp_path):
    # The others take no second portion before the slow worker holds one (a busy machine may
    # run it late): it is then the last to finish, and idle workers back it up.
    marker = str(tmp_path / "slow-worker-busy")
    others = SlowPortions(sleep_s=0.0, wait_for=marker)
    job.start_workers({0: SlowPortions(sleep_s=2.0, marker=marker), 1: others, 2: others})
    outcome, gradient = job.evaluate(1)
    job.check(outcome, gradient)
    assert outcome.figures.backups_issued >= 1
    job.finish()
