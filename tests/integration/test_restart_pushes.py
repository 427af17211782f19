"""A replica restarted after a death whose last dense push reached shard 0 but not shard 1: the
next life sends no shard a push of a step it took, so each shard applies each step's update once
and ends with exactly the parameters and version of a run without the death. Under sync rounds
a shard whose open round holds the dead life's gradient takes none of the next life's into it.

The shards are served on 127.0.0.1 in this process (the dead push is handed to shard 0 itself).
The loss is linear in the parameters, so a step's gradient does not depend on the parameters it
was computed from, and a life's step N pushes what another life's step N pushed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from distbelief.config import ConsistencyConfig, JobConfig
from distbelief.optim import DownpourSGD
from distbelief.worker import run_worker
from tests.conftest import StopAt, served_shards

NUM_STEPS = 8
DEAD_AT = 4
"""The dead life pushed steps 1-3 to both shards and step 4 to shard 0 only."""
WORKER = "worker0"


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        (torch.randn(16, 10, generator=generator), torch.randn(16, 3, generator=generator))
        for _ in range(NUM_STEPS)
    ]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(10, 3)


def _backward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    inputs, weights = batch
    model.zero_grad()
    (model(inputs) * weights).sum().backward()  # linear: the gradient ignores the parameters


def _optimizer(
    model: nn.Module, addresses: list[str], compression: str, n_push: int = 1
) -> DownpourSGD:
    return DownpourSGD(
        model.parameters(),
        lr=0.1,
        n_push=n_push,
        model=model,
        ps=addresses,
        blocking=True,
        timeout_s=10,
        worker_id=WORKER,
        push_compression=compression,
    )


def _train(optimizer: DownpourSGD, model: nn.Module, batches) -> None:
    for batch in batches:
        _backward(model, batch)
        optimizer.step()


def _dead_life(shards, addresses, compression: str, last_push_to, n_push: int, dead_at: int):
    """Steps 1 to ``dead_at`` - 1 trained, pushed to every shard every ``n_push`` steps; the
    push of step ``dead_at`` (the sum of the gradients since the last push: a flush, when off
    the push period) handed to the shards ``last_push_to`` only; then the life ends."""
    model = _model()
    optimizer = _optimizer(model, addresses, compression, n_push)
    _train(optimizer, model, _batches()[: dead_at - 1])
    flats = []
    for batch in _batches()[_last_push(n_push, dead_at) : dead_at]:
        _backward(model, batch)
        flats.append(optimizer.layout.flatten([p.grad for p in model.parameters()]))
    flat = {dtype: sum(flat[dtype] for flat in flats) for dtype in flats[0]}
    for shard_id in last_push_to:
        grads = [view.clone() for _, view in optimizer.client.slice_views(shard_id, flat)]
        shards[shard_id].push(grads, worker=WORKER, clock=dead_at)
    optimizer.client.close(wait=False)


def _last_push(n_push: int, dead_at: int) -> int:
    """The step of the dead life's last push before step ``dead_at``'s."""
    return (dead_at - 1) // n_push * n_push


def _next_life(addresses, compression: str, n_push: int, resume_step: int) -> None:
    """A restarted replica's life, as a restarted worker starts one: from ``resume_step``,
    given each shard's word on the last push it took."""
    model = _model()
    optimizer = _optimizer(model, addresses, compression, n_push)
    optimizer.resume(resume_step, optimizer.client.pushed_steps)
    _train(optimizer, model, _batches()[resume_step:])
    optimizer.close()


def _finished(shards) -> list[tuple[int, list[torch.Tensor]]]:
    return [(shard.version, shard.parameters()) for shard in shards]


def _run(
    compression: str, last_push_to: tuple[int, ...] | None, n_push: int = 1, dead_at=DEAD_AT
) -> list:
    """Each shard's version and parameters at the end: a death after step ``dead_at``'s push
    reached ``last_push_to`` (None: no death)."""
    with served_shards(2) as (shards, addresses):
        if last_push_to is None:
            model = _model()
            optimizer = _optimizer(model, addresses, compression, n_push)
            _train(optimizer, model, _batches())
            optimizer.close()
        else:
            _dead_life(shards, addresses, compression, last_push_to, n_push, dead_at)
            on_all = len(last_push_to) == len(shards)
            resume_step = dead_at if on_all else _last_push(n_push, dead_at)
            _next_life(addresses, compression, n_push, resume_step)
        return _finished(shards)


def _assert_same(got: tuple[int, list], want: tuple[int, list]) -> None:
    assert got[0] == want[0]
    for got_values, want_values in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(got_values, want_values, rtol=0, atol=0)


def test_a_push_that_reached_some_shards_is_applied_once_on_each():
    """Shard 0 took the dead life's step 4, shard 1 did not: the next life goes on after step
    3, pushes step 4 to shard 1 only, and both shards end as if no one had died."""
    restarted = _run("none", last_push_to=(0,))
    undisturbed = _run("none", last_push_to=None)
    assert [version for version, _ in undisturbed] == [NUM_STEPS, NUM_STEPS]
    for got, want in zip(restarted, undisturbed, strict=True):
        _assert_same(got, want)


def test_a_compressed_push_left_out_keeps_no_residual_for_that_shard():
    """With top-k pushes a shard left out of step 4 gets none of what that step's gradient
    left behind: shard 0 ends as when the death found step 4 on both shards (the next life
    starting after it), shard 1 as when step 4 reached neither."""
    compression = "topk:0.25"
    restarted = _run(compression, last_push_to=(0,))
    on_both = _run(compression, last_push_to=(0, 1))
    on_neither = _run(compression, last_push_to=())
    _assert_same(restarted[0], on_both[0])
    _assert_same(restarted[1], on_neither[1])


def test_a_push_off_the_push_period_that_reached_some_shards_is_not_sent_them_again():
    """Pushing every 3 steps, the dead life's flush at step 5 reached shard 0 only: the next life
    goes on after step 3 and pushes at step 5 too, to shard 1 only, so shard 0 gets steps 4
    and 5 once (a push at step 6 would have carried them)."""
    restarted = _run("none", last_push_to=(0,), n_push=3, dead_at=5)
    on_both = _run("none", last_push_to=(0, 1), n_push=3, dead_at=5)
    undisturbed = _run("none", last_push_to=None, n_push=3)
    _assert_same(restarted[0], on_both[0])
    version, values = restarted[1]
    assert version == 4  # step 3's push, then steps 4-5, step 6 and the flush of steps 7-8
    for got, want in zip(values, undisturbed[1][1], strict=True):
        torch.testing.assert_close(got, want)


def test_a_restarted_worker_sends_a_shard_no_step_it_took():
    """``run_worker`` restarted after a death whose step-6 push reached shard 0 only: it goes
    on after step 5 and each shard applies each of the 10 steps once."""
    config = JobConfig.from_fields(
        {
            **{"model.name": "mlp", "data.name": "synthetic", "optimizer.steps": 10},
            **{"optimizer.batch_size": 8, "cluster.num_workers": 1, "cluster.num_shards": 2},
            "faults.timeout_s": 10.0,
        }
    )
    started: list[int] = []

    def emit(kind: str, payload: dict) -> None:
        if kind == "started":
            started.append(payload["step"])

    with served_shards(2) as (shards, addresses):
        run_worker(config, 0, addresses, emit=emit, hooks=[StopAt(5)])
        assert [shard.version for shard in shards] == [5, 5]
        ones = [torch.ones(piece.numel, dtype=piece.dtype) for piece in shards[0].slices]
        shards[0].push(ones, worker=WORKER, clock=6)  # step 6 of the dead life, shard 0 only
        run_worker(config, 0, addresses, emit=emit, resume_step=5, restarted=True)
        assert started == [0, 5]
        assert [shard.version for shard in shards] == [10, 10]


@pytest.mark.parametrize("applied_step", [[3], [3, -1], [3, 2.0], 1.5])
def test_resume_refuses_applied_steps_that_are_no_step_per_shard(applied_step):
    with served_shards(2) as (_, addresses):
        model = _model()
        optimizer = _optimizer(model, addresses, "none")
        try:
            with pytest.raises(ValueError, match="applied_step"):
                optimizer.resume(3, applied_step)
        finally:
            optimizer.close()


def _sync_round(dead_push_to: tuple[int, ...] | None) -> tuple[list, list[int]]:
    """Each shard's version and parameters after one sync round of two workers, and the
    gradients each dropped: worker1's gradient (all ones) pushed once worker0's next life's
    reached every shard. ``dead_push_to``: worker0's first life died after its gradient for the
    round reached these shards (None: no death)."""
    sync = {"consistency": ConsistencyConfig(sync=True), "num_workers": 2}
    with served_shards(2, **sync) as (shards, addresses), ThreadPoolExecutor(1) as pool:
        if dead_push_to is not None:
            _dead_life(shards, addresses, "none", dead_push_to, n_push=1, dead_at=1)
        model = _model()
        optimizer = _optimizer(model, addresses, "none")
        optimizer.resume(0, optimizer.client.pushed_steps)
        pushes = [shard.counters().num_pushes + 1 for shard in shards]
        stepping = pool.submit(_train, optimizer, model, _batches()[:1])  # held for the round
        deadline = time.monotonic() + 30
        while [shard.counters().num_pushes for shard in shards] != pushes:
            assert time.monotonic() < deadline and not stepping.done(), "worker0 never pushed"
            time.sleep(0.01)
        for shard in shards:
            ones = [torch.ones(piece.numel, dtype=piece.dtype) for piece in shard.slices]
            shard.push(ones, worker="worker1", base_version=0)
        stepping.result(timeout=30)
        optimizer.close()
        return _finished(shards), [shard.counters().num_dropped for shard in shards]


@pytest.mark.parametrize("dead_push_to", [(0,), (0, 1)])
def test_under_sync_rounds_a_restarted_worker_adds_no_second_gradient_to_a_round(dead_push_to):
    """Worker0's dead life's gradient for round 0 reached ``dead_push_to``: there its next
    life's is dropped (the round already holds one of worker0's), elsewhere it joins the round,
    and every round averages one gradient of each worker, as without the death."""
    restarted, dropped = _sync_round(dead_push_to)
    undisturbed, _ = _sync_round(None)
    assert dropped == [int(shard_id in dead_push_to) for shard_id in range(2)]
    assert [version for version, _ in undisturbed] == [1, 1]
    for got, want in zip(restarted, undisturbed, strict=True):
        _assert_same(got, want)
