"""Sandblaster L-BFGS for real against torch.optim.LBFGS: three shard processes holding slices of
the vectors, the coordinator (its service on a real socket and its L-BFGS, wired as
``coordinator/run.py`` wires them) in the test process, and four worker processes computing 40
portions per evaluation of a float64 model on digits. The parameters after each iteration are
torch's, whatever order the portions' sums arrive in.

The shards and workers are children of one forkserver that imports torch once (seven imports of
torch would be most of the test's time on two cores); the test stops it at the end.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
import torch
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.client.vectors import ShardVectors
from distbelief.config import ServerConfig
from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.lbfgs import LBFGSSettings, SandblasterLBFGS
from distbelief.coordinator.service import CoordinatorService
from distbelief.data import load_dataset
from distbelief.launch.local import stop_forkserver
from distbelief.optim.sandblaster import run_sandblaster_worker
from distbelief.server.optimizers import server_optimizer_from_config
from distbelief.server.process import serve_shard
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire import serve
from distbelief.wire.vector_program import Program
from tests.unit.local_vectors import torch_lbfgs_sequence

NUM_SHARDS = 3
NUM_WORKERS = 4
NUM_PORTIONS = 40
BATCH_SIZE = 400
HISTORY = 5
ITERATIONS = 15
TIMEOUT_S = 60.0
"""Limits of blocking calls; only failing runs ever wait this long."""
_PRELOAD = ["torch", "distbelief.server.process", "distbelief.optim.sandblaster", __name__]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(1024, 16), nn.Tanh(), nn.Linear(16, 10)).double()


def _shard_main(shard_id: int, ready: Connection, stop) -> None:
    torch.set_num_threads(1)

    def emit(kind: str, payload) -> None:
        if kind == "ready":
            ready.send(payload["address"])

    serve_shard(
        shard_id,
        NUM_SHARDS,
        "tcp://127.0.0.1:0",
        optimizer_factory=server_optimizer_from_config(ServerConfig()),
        emit=emit,
        stop=stop,
    )


def _worker_main(rank: int, coordinator: str, shards: list[str]) -> None:
    torch.set_num_threads(1)
    run_sandblaster_worker(
        _model(),
        load_dataset("digits", split="train"),
        rank,
        coordinator,
        shards,
        timeout_s=TIMEOUT_S,
        micro_batch_size=64,
    )


class Children:
    """The shard and worker processes, forked by one forkserver."""

    def __init__(self) -> None:
        self.context = mp.get_context("forkserver")
        self.context.set_forkserver_preload(_PRELOAD)
        self.stop = self.context.Event()
        self.shards: list = []
        self.workers: list = []

    def start_shards(self) -> list[str]:
        pipes = []
        for shard_id in range(NUM_SHARDS):
            reader, writer = self.context.Pipe(duplex=False)
            process = self.context.Process(
                target=_shard_main, args=(shard_id, writer, self.stop), name=f"shard{shard_id}"
            )
            process.start()
            writer.close()
            self.shards.append(process)
            pipes.append(reader)
        addresses = []
        for shard_id, reader in enumerate(pipes):
            assert reader.poll(TIMEOUT_S), f"shard {shard_id} did not start"
            addresses.append(reader.recv())
            reader.close()
        return addresses

    def start_workers(self, coordinator: str, shards: list[str]) -> None:
        for rank in range(NUM_WORKERS):
            process = self.context.Process(
                target=_worker_main, args=(rank, coordinator, shards), name=f"worker{rank}"
            )
            process.start()
            self.workers.append(process)

    def close(self) -> None:
        self.stop.set()
        for process in self.workers:
            if process.is_alive():
                process.kill()
        for process in [*self.workers, *self.shards]:
            process.join(TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join(TIMEOUT_S)


@pytest.fixture(scope="module")
def forkserver() -> Iterator[None]:
    """The forkserver the tests' children come from, stopped after the last test."""
    yield
    stop_forkserver()


@pytest.fixture
def children(forkserver) -> Iterator[Children]:
    started = Children()
    yield started
    started.close()


def _torch_sequence(plan: BatchPlan, line_search: str | None, lr: float) -> list[torch.Tensor]:
    """torch's LBFGS on the same batch, one iteration per step(), the parameters after each."""
    dataset = load_dataset("digits", split="train")
    indices = plan.indices()
    inputs, labels = dataset.images[indices].double(), dataset.labels[indices]
    return torch_lbfgs_sequence(
        _model(),
        inputs,
        labels,
        history=HISTORY,
        line_search=line_search,
        lr=lr,
        iterations=ITERATIONS,
    )


class Coordinator:
    """The shards initialised with the model, the coordinator's service on a real socket and
    its L-BFGS over the shards' vectors."""

    def __init__(self, addresses: list[str], plan: BatchPlan) -> None:
        model = _model()
        specs = tensor_specs(model.named_parameters())
        self.layout = FlatLayout(specs)
        self.client = ParameterServerClient(addresses, specs, timeout_s=TIMEOUT_S)
        self.client.handshake(self.layout.flatten(list(model.parameters())))
        self.vectors = ShardVectors(self.client)
        self.addresses = addresses
        self.service = CoordinatorService(plan, self._commit, max_wait_s=1.0)
        self.server = serve("tcp://127.0.0.1:0", self.service)
        self.outcomes: list = []

    def _commit(self, evaluation: int, bundle: str) -> None:
        program = Program()
        program.commit(evaluation, bundle)
        self.vectors.run(program)

    def lbfgs(self, settings: LBFGSSettings) -> SandblasterLBFGS:
        def evaluate(evaluation: int, point: str):
            self.outcomes.append(self.service.evaluate(evaluation, point, TIMEOUT_S))
            return self.outcomes[-1]

        return SandblasterLBFGS(self.vectors, evaluate, settings)

    def param(self) -> torch.Tensor:
        flats = self.layout.allocate()
        self.vectors.read("param", flats)
        return flats[torch.float64]

    def close(self) -> None:
        self.server.stop()
        self.client.close(wait=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("line_search", "lr"), [("strong-wolfe", 1.0), ("fixed", 0.5)], ids=["strong-wolfe", "fixed"]
)
def test_parameter_sequence_equals_torch_lbfgs(children, line_search, lr):
    dataset_size = len(load_dataset("digits", split="train"))
    plan = BatchPlan(num_examples=dataset_size, num_portions=NUM_PORTIONS, batch_size=BATCH_SIZE)
    coordinator = Coordinator(children.start_shards(), plan)
    try:
        children.start_workers(coordinator.server.address, coordinator.addresses)
        torch_line_search = "strong_wolfe" if line_search == "strong-wolfe" else None
        expected = _torch_sequence(plan, torch_line_search, lr)
        settings = LBFGSSettings(history_size=HISTORY, line_search=line_search, lr=lr)
        lbfgs = coordinator.lbfgs(settings)
        assert lbfgs.start().stop_reason is None
        num_evaluations = 0
        for iteration, theirs in enumerate(expected, start=1):
            record = lbfgs.step()
            assert record.stop_reason is None, record
            num_evaluations += record.num_evaluations
            torch.testing.assert_close(
                coordinator.param(), theirs, rtol=0, atol=1e-7, msg=f"iteration {iteration}"
            )
        assert len(coordinator.outcomes) == 1 + num_evaluations >= 1 + ITERATIONS
        lives = set()
        for outcome in coordinator.outcomes:
            assert sum(outcome.figures.portions_by_worker.values()) == NUM_PORTIONS
            lives.update(outcome.figures.portions_by_worker)
        assert len({life.partition("-")[0] for life in lives}) > 1  # the sums came from several
        assert coordinator.service.finish(timeout_s=TIMEOUT_S) == 0
        for process in children.workers:
            process.join(TIMEOUT_S)
        assert [p.exitcode for p in children.workers] == [0] * NUM_WORKERS
    finally:
        coordinator.close()
