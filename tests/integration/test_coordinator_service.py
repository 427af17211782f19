"""The coordinator's service over real sockets on 127.0.0.1: SandblasterWorkers in threads ask
it for portions and push bundles to in-process shards (real ShardStores run by the real
VectorExecutor), and every portion's gradient is committed exactly once, whatever the workers
do: finish in any order, lose their connection, race backups."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.client import CoordinatorClient, Finished
from distbelief.coordinator.service import CoordinatorService
from distbelief.data import load_dataset
from distbelief.errors import (
    CoordinatorError,
    CoordinatorUnavailableError,
    EvaluationStalledError,
    RemoteError,
    ShardRestartedError,
)
from distbelief.models import MLP
from distbelief.optim.sandblaster import PortionInfo, SandblasterWorker, run_sandblaster_worker
from distbelief.server.vectors import EvaluationAccumulator
from distbelief.wire import Message, serve
from distbelief.wire.vector_program import Program
from tests.unit.local_vectors import LocalShards

NUM_PORTIONS = 12
TIMEOUT_S = 60.0


class LockedVectors:
    """The in-process shards as workers and the coordinator use them, one call at a time (a
    real shard serialises them under its lock)."""

    def __init__(self, shards: LocalShards) -> None:
        self.shards = shards
        self.lock = threading.Lock()

    def run(self, program: Program) -> list:
        with self.lock:
            return self.shards.run(program)

    def commit(self, evaluation: int, bundle: str) -> None:
        program = Program()
        program.commit(evaluation, bundle)
        self.run(program)

    def read(self, vector: str, flat_out: dict) -> None:
        with self.lock:
            for dtype, tensor in self.shards.gather(vector).items():
                flat_out[dtype].copy_(tensor)

    def push_bundle(self, evaluation: int, bundle: str, flat_grads: dict) -> None:
        with self.lock:
            self.shards.scatter_bundle(evaluation, bundle, flat_grads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train")


def _model(dataset) -> nn.Module:
    torch.manual_seed(0)
    return MLP(dataset.input_shape, dataset.num_classes, hidden_sizes=(16,)).double()


def _full_batch_sums(model: nn.Module, dataset, plan: BatchPlan) -> tuple[float, torch.Tensor]:
    indices = plan.indices()
    images = dataset.images[indices].double()
    loss = nn.functional.cross_entropy(model(images), dataset.labels[indices], reduction="sum")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.item(), torch.cat([g.flatten() for g in grads])


class Job:
    """A service on a real socket, in-process shards and worker threads."""

    def __init__(self, dataset, plan: BatchPlan, **service_options) -> None:
        self.dataset, self.plan = dataset, plan
        self.model = _model(dataset)
        self.vectors = LockedVectors(LocalShards(self.model, 2))
        self.service = CoordinatorService(plan, self.vectors.commit, **service_options)
        self.server = serve("tcp://127.0.0.1:0", self.service)
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.results: list[dict] = []

    def start_worker(self, rank: int, after_portion=None) -> None:
        def work() -> None:
            coordinator = CoordinatorClient(self.server.address, f"worker{rank}", timeout_s=30)
            worker = SandblasterWorker(
                _model(self.dataset),
                self.dataset,
                coordinator,
                self.vectors,  # type: ignore[arg-type]
                portions_per_push=2,
                micro_batch_size=64,
                max_wait_s=0.5,
                after_portion=after_portion,
            )
            try:
                self.results.append(worker.run())
            except BaseException as e:
                self.errors.append(e)
            finally:
                coordinator.close()

        thread = threading.Thread(target=work, name=f"worker{rank}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def evaluate(self, evaluation: int, timeout_s: float = TIMEOUT_S):
        program = Program()
        program.open_evaluation(evaluation, f"g{evaluation}")
        self.vectors.run(program)
        outcome = self.service.evaluate(evaluation, "param", timeout_s)
        program = Program()
        program.close_evaluation(evaluation)
        self.vectors.run(program)
        return outcome, self.vectors.shards.gather(f"g{evaluation}")[torch.float64]

    def stop(self) -> None:
        assert self.service.finish(timeout_s=TIMEOUT_S) == 0
        for thread in self.threads:
            thread.join(TIMEOUT_S)
        self.server.stop()
        assert not self.errors, self.errors
        assert not any(thread.is_alive() for thread in self.threads)


@pytest.fixture
def job_factory():
    jobs: list[Job] = []

    def make(dataset, plan: BatchPlan, **options) -> Job:
        jobs.append(Job(dataset, plan, **options))
        return jobs[-1]

    yield make
    for job in jobs:
        job.service.scheduler.stop()
        job.server.stop()


def _assert_exact(job: Job, outcome, grad: torch.Tensor) -> None:
    loss_sum, expected = _full_batch_sums(job.model, job.dataset, job.plan)
    assert outcome.num_examples == job.plan.size
    assert outcome.loss_sum == pytest.approx(loss_sum, rel=1e-9)
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert sum(outcome.figures.portions_by_worker.values()) == job.plan.num_portions


def test_three_workers_sum_every_portion_once_over_two_evaluations(digits, job_factory):
    plan = BatchPlan(num_examples=len(digits), num_portions=NUM_PORTIONS, batch_size=600)
    job = job_factory(digits, plan)
    for rank in range(3):
        job.start_worker(rank)
    for evaluation in (1, 2):
        outcome, grad = job.evaluate(evaluation)
        _assert_exact(job, outcome, grad)
    job.stop()
    assert sum(result["portions"] for result in job.results) >= 2 * NUM_PORTIONS
    assert all(result["lost"] == 0 for result in job.results)


def test_a_lost_workers_staged_bundle_is_never_committed(digits, job_factory):
    plan = BatchPlan(num_examples=len(digits), num_portions=NUM_PORTIONS, batch_size=600)
    job = job_factory(digits, plan)
    outcomes: list = []
    evaluating = threading.Thread(target=lambda: outcomes.append(job.evaluate(1)))
    evaluating.start()
    # A worker that finishes a portion, stages a bogus bundle for it on the shards, and dies.
    doomed = CoordinatorClient(job.server.address, "doomed", timeout_s=30)
    reply = doomed.ask()
    while reply.task is None:
        reply = doomed.ask()
    assert doomed.ask(Finished(1, reply.task.portion, 123.0)).finished == "accepted"
    flats = job.vectors.shards.layout.allocate()
    flats[torch.float64].fill_(1e6)
    job.vectors.push_bundle(1, doomed.next_bundle_id(), flats)
    doomed.close()
    for rank in range(3):
        job.start_worker(rank)
    evaluating.join(TIMEOUT_S)
    outcome, grad = outcomes.pop()
    _assert_exact(job, outcome, grad)
    assert outcome.figures.reassigned >= 1
    assert not any(worker.startswith("doomed") for worker in outcome.figures.portions_by_worker)
    job.stop()


def test_a_shard_restarted_mid_evaluation_fails_it_instead_of_stalling(
    digits, job_factory, monkeypatch, caplog
):
    """A shard restarted from its checkpoint has no evaluation open, so it refuses the workers'
    bundles: they must still be reported, so that their commit, which the restarted shard
    refuses, fails the evaluation (the coordinator then goes back to its last checkpoint)
    instead of leaving it waiting for commits that never come. A fault the job recovers from,
    it is logged as a warning, not as the coordinator's error."""
    plan = BatchPlan(num_examples=len(digits), num_portions=NUM_PORTIONS, batch_size=600)
    job = job_factory(digits, plan)
    program = Program()
    program.open_evaluation(1, "g1")
    job.vectors.run(program)
    job.vectors.shards.executors[1].accumulator = EvaluationAccumulator()  # shard 1 restarts

    def refused(program: Program) -> list:  # as ShardVectors answers for a restarted shard
        raise ShardRestartedError("shard 1 was restarted: its vectors are its last checkpoint's")

    monkeypatch.setattr(job.vectors, "run", refused)
    for rank in range(2):
        job.start_worker(rank)
    with pytest.raises(CoordinatorError, match=r"evaluation 1: committing bundle .* restarted"):
        job.service.evaluate(1, "param", TIMEOUT_S)
    job.stop()
    refused_commits = [r for r in caplog.records if "not committed" in r.getMessage()]
    assert refused_commits, caplog.text
    assert {r.levelname for r in refused_commits} == {"WARNING"}
    assert "shard 1 was restarted" in refused_commits[0].getMessage()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_slow_worker_is_backed_up_and_its_late_answers_count_once(digits, job_factory):
    """Worker 0 holds its first portion until worker 1 has computed it as a backup, however
    busy the machine: worker 1 starts only once worker 0 holds it, so it is the one left."""
    plan = BatchPlan(num_examples=len(digits), num_portions=6, batch_size=300)
    job = job_factory(digits, plan, max_holders=2)
    holding, backed_up = threading.Event(), threading.Event()

    def slow(info: PortionInfo) -> None:
        if not holding.is_set():
            holding.set()
            assert backed_up.wait(TIMEOUT_S), "no backup of the held portion"

    def backs_up(info: PortionInfo) -> None:
        if info.backup:
            backed_up.set()

    def start_the_backup() -> None:
        if holding.wait(TIMEOUT_S):
            job.start_worker(1, after_portion=backs_up)

    job.start_worker(0, after_portion=slow)
    starter = threading.Thread(target=start_the_backup, daemon=True)
    starter.start()
    outcome, grad = job.evaluate(1)
    starter.join(TIMEOUT_S)
    _assert_exact(job, outcome, grad)
    assert outcome.figures.backups_issued >= 1
    job.stop()


def test_a_restarted_coordinator_gets_no_answer_computed_for_its_former_life(digits):
    """A coordinator restarted from its checkpoint numbers its evaluations again from there:
    a portion computed for the old life (at another point) must not count in the new one, and
    the worker must read the point again."""
    plan = BatchPlan(num_examples=len(digits), num_portions=4, batch_size=200)
    model = _model(digits)
    vectors = LockedVectors(LocalShards(model, 2))
    old = CoordinatorService(plan, vectors.commit)
    server = serve("tcp://127.0.0.1:0", old)
    computed, restarted = threading.Event(), threading.Event()

    def pause_after_the_first(info: PortionInfo) -> None:
        if not computed.is_set():
            computed.set()
            assert restarted.wait(TIMEOUT_S)

    errors: list[BaseException] = []

    def work() -> None:
        coordinator = CoordinatorClient(server.address, "worker0", timeout_s=30)
        worker = SandblasterWorker(
            _model(digits), digits, coordinator, vectors, after_portion=pause_after_the_first
        )
        try:
            worker.run()
        except BaseException as e:
            errors.append(e)
        finally:
            coordinator.close()

    thread = threading.Thread(target=work, name="worker0", daemon=True)
    new = CoordinatorService(plan, vectors.commit)
    try:
        old.scheduler.open(1, "param")
        thread.start()
        assert computed.wait(TIMEOUT_S), "the worker computed nothing"
        server.stop()  # the old life dies with a portion of evaluation 1 computed for it
        moved = Program()
        moved.scale("param", 0.5)  # the new life's evaluation 1 is at another point
        vectors.run(moved)
        server = serve(server.address, new)
        restarted.set()
        program = Program()
        program.open_evaluation(1, "g1")
        vectors.run(program)
        outcome = new.evaluate(1, "param", TIMEOUT_S)
        program = Program()
        program.close_evaluation(1)
        vectors.run(program)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(0.5)
        job = Job.__new__(Job)  # only what _assert_exact reads
        job.model, job.dataset, job.plan = model, digits, plan
        _assert_exact(job, outcome, vectors.shards.gather("g1")[torch.float64])
        assert new.finish(timeout_s=TIMEOUT_S) == 0
        thread.join(TIMEOUT_S)
        assert not errors, errors
    finally:
        restarted.set()
        new.scheduler.stop()
        server.stop()


def test_a_worker_that_missed_the_coordinator_stops_when_its_flag_says_so(digits):
    """The coordinator finished (or never answered) before this worker reached it: once the
    launcher sets the workers' stop flag the worker returns, instead of retrying until its
    retry timeout runs out and failing the job."""
    from distbelief.config import ServerConfig
    from distbelief.server.optimizers import server_optimizer_from_config
    from distbelief.server.process import serve_shard
    from tests.conftest import free_port

    ready, stop_shard, stop = threading.Event(), threading.Event(), threading.Event()
    addresses: list[str] = []

    def emit(kind: str, payload) -> None:
        if kind == "ready":
            addresses.append(payload["address"])
            ready.set()

    shard = threading.Thread(
        target=serve_shard,
        args=(0, 1, "tcp://127.0.0.1:0"),
        kwargs={
            "optimizer_factory": server_optimizer_from_config(ServerConfig()),
            "emit": emit,
            "stop": stop_shard,
        },
        daemon=True,
    )
    shard.start()
    results: list = []

    def work() -> None:
        results.append(
            run_sandblaster_worker(
                _model(digits),
                digits,
                0,
                f"tcp://127.0.0.1:{free_port()}",  # nobody listens there
                addresses,
                timeout_s=5,
                retry_timeout_s=600,
                stop=stop,
            )
        )

    worker = threading.Thread(target=work, name="worker0", daemon=True)
    try:
        assert ready.wait(TIMEOUT_S), "the shard did not start"
        worker.start()
        stop.set()
        worker.join(TIMEOUT_S)
        assert not worker.is_alive(), "the worker kept waiting for the coordinator"
        assert results == [
            {"rank": 0, "portions": 0, "accepted": 0, "duplicates": 0, "bundles": 0, "lost": 0}
        ]
    finally:
        stop.set()
        worker.join(TIMEOUT_S)
        stop_shard.set()
        shard.join(TIMEOUT_S)


def test_an_evaluation_nobody_works_on_stalls_with_a_typed_error(digits, job_factory):
    job = job_factory(digits, BatchPlan(num_examples=len(digits), num_portions=3))
    with pytest.raises(EvaluationStalledError, match=r"evaluation 1: no portion finished for 0.5s"):
        job.service.evaluate(1, "param", timeout_s=0.5)
    job.stop()


def test_malformed_requests_are_refused_naming_what_is_wrong(digits, job_factory):
    from distbelief.coordinator.protocol import BUNDLE, WORK
    from distbelief.wire import connect

    job = job_factory(digits, BatchPlan(num_examples=len(digits), num_portions=3))
    rpc = connect(job.server.address, name="coordinator")
    with pytest.raises(RemoteError, match="worker must be a string of 1-32 chars, got None"):
        rpc.request(Message(WORK, {"session": "s"}), timeout_s=30)
    meta = {"worker": "w", "session": "s", "evaluation": 0, "bundle": "x-1", "portions": [0]}
    with pytest.raises(RemoteError, match="bundle must be named w-s-<n>"):
        rpc.request(Message(BUNDLE, meta), timeout_s=30)
    finished = {"evaluation": 0, "portion": 0, "loss_sum": 1.5}
    with pytest.raises(RemoteError, match=r"loss_sum must be a float\.hex string, got 1\.5"):
        rpc.request(
            Message(WORK, {"worker": "w", "session": "s", "finished": finished}), timeout_s=30
        )
    rpc.close()
    job.stop()


def test_a_coordinator_that_cannot_be_reached_is_a_typed_error_after_the_retries():
    from tests.conftest import free_port

    client = CoordinatorClient(
        f"tcp://127.0.0.1:{free_port()}", "worker0", timeout_s=5, retry_timeout_s=0.3
    )
    with pytest.raises(CoordinatorUnavailableError, match=r"gave up after retrying for 0\.3s"):
        client.ask()
    client.close()


def test_finish_waits_for_a_worker_that_connects_only_after_the_last_evaluation(
    digits, job_factory
):
    plan = BatchPlan(num_examples=len(digits), num_portions=4, batch_size=200)
    job = job_factory(digits, plan)
    job.start_worker(0)
    job.evaluate(1)
    told: list[int] = []
    finishing = threading.Thread(
        target=lambda: told.append(
            job.service.finish(timeout_s=TIMEOUT_S, expected=["worker0", "worker1"])
        )
    )
    finishing.start()
    time.sleep(0.5)  # worker1 is still starting up when the job ends
    assert finishing.is_alive()
    job.start_worker(1)  # it is told to stop, not left to retry a closed coordinator
    finishing.join(TIMEOUT_S)
    assert told == [0]
    job.stop()


def test_finish_does_not_wait_for_a_worker_that_connected_and_died(digits, job_factory):
    plan = BatchPlan(num_examples=len(digits), num_portions=4, batch_size=200)
    job = job_factory(digits, plan)
    dead = CoordinatorClient(job.server.address, "worker1", timeout_s=30)
    dead.ask(max_wait_s=0.0)  # it connected, then its process was killed
    dead.close()
    job.start_worker(0)
    job.evaluate(1)
    started = time.monotonic()
    untold = job.service.finish(timeout_s=TIMEOUT_S, expected=["worker0", "worker1"])
    assert untold == 0
    # Told worker0 and returned, rather than waiting out the timeout for worker1.
    assert time.monotonic() - started < TIMEOUT_S / 2
    job.stop()


def test_a_connected_worker_that_is_never_told_counts_once(digits, job_factory):
    # Connected, then frozen (SIGSTOP): it neither asks again nor closes. The job says one
    # worker was not told, not two (its connection and its id).
    plan = BatchPlan(num_examples=len(digits), num_portions=4, batch_size=200)
    job = job_factory(digits, plan)
    frozen = CoordinatorClient(job.server.address, "worker1", timeout_s=30)
    try:
        frozen.ask(max_wait_s=0.0)
        assert job.service.finish(timeout_s=1.0, expected=["worker1"]) == 1
    finally:
        frozen.close()
