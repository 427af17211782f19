"""A Sandblaster worker whose task names a point that a shard no longer holds (the shard was
restarted after the coordinator handed the task out, and its checkpoint lacks the line
search's trial point) reports the portion all the same: the coordinator finds the restart when
it commits, instead of the worker failing the job."""

from __future__ import annotations

import threading

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.client.vectors import ShardVectors
from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.service import CoordinatorService
from distbelief.data import load_dataset
from distbelief.errors import CoordinatorError, EvaluationStalledError
from distbelief.models import MLP
from distbelief.optim.sandblaster import run_sandblaster_worker
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire import serve
from distbelief.wire.vector_program import Program
from tests.conftest import served_shards

TIMEOUT_S = 60.0
"""Limits of blocking calls; only failing runs ever wait this long."""


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP((1, 32, 32), 10, hidden_sizes=(16,))


def _commit_on(vectors: ShardVectors):
    def commit(evaluation: int, bundle: str) -> None:
        program = Program()
        program.commit(evaluation, bundle)
        vectors.run(program)

    return commit


def _as_restarted(shard) -> None:
    """Leave ``shard`` as a restart from a checkpoint taken before the evaluation leaves it: no
    trial point, no evaluation open."""
    program = Program()
    program.drop("trial")
    program.close_evaluation(1)
    shard.run_program(program.to_json())


@pytest.mark.timeout(120)
def test_a_point_lost_on_a_shard_fails_the_commit_not_the_worker():
    model = _model()
    specs = tensor_specs(model.named_parameters())
    dataset = load_dataset("digits", split="train")
    with served_shards(2) as (shards, addresses):
        client = ParameterServerClient(addresses, specs, timeout_s=TIMEOUT_S)
        client.handshake(FlatLayout(specs).flatten(list(model.parameters())))
        vectors = ShardVectors(client)
        program = Program()
        program.copy("trial", "param")
        program.open_evaluation(1, "g1")
        vectors.run(program)
        _as_restarted(shards[1])
        plan = BatchPlan(num_examples=len(dataset), num_portions=2, batch_size=200)
        service = CoordinatorService(plan, _commit_on(vectors), max_wait_s=1.0)
        server = serve("tcp://127.0.0.1:0", service)
        failures: list[BaseException] = []

        def work() -> None:
            try:
                run_sandblaster_worker(
                    _model(), dataset, 0, server.address, addresses, timeout_s=TIMEOUT_S
                )
            except BaseException as e:  # the assertion below names it
                failures.append(e)

        worker = threading.Thread(target=work)
        worker.start()
        try:
            with pytest.raises(CoordinatorError) as raised:
                service.evaluate(1, "trial", TIMEOUT_S)
            assert not isinstance(raised.value, EvaluationStalledError)
        finally:
            service.finish(timeout_s=TIMEOUT_S)
            worker.join(TIMEOUT_S)
            server.stop()
            client.close(wait=False)
        assert not worker.is_alive()
        assert failures == []
