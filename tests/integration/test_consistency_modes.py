"""Sync rounds, warmstart, SSP and DC-ASGD against real shard processes on 127.0.0.1."""

import json
import subprocess
import threading
import time

import pytest
import torch
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.errors import HeldTooLongError, ShardTimeoutError
from distbelief.optim import DownpourSGD
from distbelief.sharding import TensorSpec
from distbelief.telemetry import read_metrics
from tests.conftest import run_forked


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(seed: int, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 6, generator=generator), torch.randint(
        0, 3, (size,), generator=generator
    )


def _step(model, optimizer, batch) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


def _run_in_thread(fn) -> tuple[threading.Thread, list]:
    errors: list = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # reported to the test thread
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_sync_round_equals_average_gradient_sgd(shard_cluster):
    addresses = shard_cluster(2, "--sync", "--num-workers", "2", "--server-lr", "0.1")
    reference = _model()
    reference_sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    workers = {}
    for name in ("a", "b"):
        model = _model()
        workers[name] = (
            model,
            DownpourSGD(
                model.parameters(), lr=0.1, model=model, ps=addresses, worker_id=name, timeout_s=10
            ),
        )
    assert all(opt.sync_rounds for _, opt in workers.values())
    for step in range(3):
        batches = {"a": _batch(10 * step), "b": _batch(10 * step + 1)}
        threads = [_run_in_thread(lambda n=n, b=batches: _step(*workers[n], b[n])) for n in workers]
        for thread, errors in threads:
            thread.join(30)
            assert not errors and not thread.is_alive()
        both = (
            torch.cat([batches["a"][0], batches["b"][0]]),
            torch.cat([batches["a"][1], batches["b"][1]]),
        )
        _step(reference, reference_sgd, both)  # mean over 16 = mean of the two means
        for model, _ in workers.values():
            for got, want in zip(model.parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for _, optimizer in workers.values():
        optimizer.close()


def test_warmstart_workers_first_pull_sees_the_warm_parameters(shard_cluster):
    addresses = shard_cluster(1, "--server-lr", "0.1")
    warm = _model()
    warm_optimizer = DownpourSGD(
        warm.parameters(),
        lr=0.1,
        model=warm,
        ps=addresses,
        blocking=True,
        worker_id="w0",
        timeout_s=10,
    )
    late = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    holder: dict = {}

    def join_after_warmstart() -> None:
        holder["optimizer"] = DownpourSGD(
            late.parameters(),
            lr=0.1,
            model=late,
            ps=addresses,
            worker_id="w1",
            start_after_version=5,
            timeout_s=10,
        )

    thread, errors = _run_in_thread(join_after_warmstart)
    time.sleep(0.5)
    assert thread.is_alive()  # still waiting: no update applied yet
    for step in range(5):
        _step(warm, warm_optimizer, _batch(step))
    thread.join(30)
    assert not errors and not thread.is_alive()
    assert holder["optimizer"].version == 5
    for got, want in zip(late.parameters(), warm.parameters(), strict=True):
        assert torch.equal(got, want)
    holder["optimizer"].close()
    warm_optimizer.close()


def _wait_for_steps(
    optimizer: DownpourSGD, num_steps: int, thread: threading.Thread, errors: list
) -> None:
    """Until ``optimizer`` has begun step ``num_steps`` on ``thread`` (a busy machine may take
    seconds to get there; only a failing run waits out the deadline)."""
    deadline = time.monotonic() + 60
    while optimizer.num_steps < num_steps:
        assert not errors, errors
        assert thread.is_alive(), f"the thread ended at step {optimizer.num_steps}"
        assert time.monotonic() < deadline, f"still at step {optimizer.num_steps}"
        time.sleep(0.02)


def test_ssp_holds_the_fast_worker_until_the_slow_one_moves_or_leaves(shard_cluster):
    addresses = shard_cluster(2, "--max-staleness", "1", "--server-lr", "0.05")
    slow_model, fast_model = _model(), _model()
    slow = DownpourSGD(
        slow_model.parameters(),
        lr=0.05,
        model=slow_model,
        ps=addresses,
        blocking=True,
        worker_id="slow",
        timeout_s=10,
    )
    fast = DownpourSGD(
        fast_model.parameters(),
        lr=0.05,
        model=fast_model,
        ps=addresses,
        blocking=True,
        worker_id="fast",
        timeout_s=10,
    )

    def run_fast() -> None:
        for step in range(8):
            _step(fast_model, fast, _batch(step))

    thread, errors = _run_in_thread(run_fast)
    _wait_for_steps(fast, 2, thread, errors)
    time.sleep(1.0)  # time to go further, were it not held
    assert thread.is_alive() and fast.num_steps == 2  # held at its pull at clock 2
    for step in range(2):
        _step(slow_model, slow, _batch(100 + step))
    _wait_for_steps(fast, 4, thread, errors)
    time.sleep(1.0)
    assert thread.is_alive() and fast.num_steps == 4  # moved on exactly as far as allowed
    slow.close()  # a worker that leaves (or dies: its sockets close) releases the others
    thread.join(30)
    assert not errors and not thread.is_alive() and fast.num_steps == 8
    fast.close()


def _train(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    return run_forked("train", "--out", str(tmp_path), *flags)


def test_cli_sync_with_a_backup_worker(tmp_path):
    result = _train(
        tmp_path, "--sync", "--backup-workers", "1", "--workers", "3", "--steps", "8", "--no-plots"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["version"] >= 8  # one update per round, each worker in >= 8 rounds


def test_cli_async_adagrad_dc_asgd_ssp_warmstart(tmp_path):
    result = _train(
        tmp_path,
        "--server-optimizer",
        "adagrad",
        "--staleness-policy",
        "dc-asgd",
        "--max-staleness",
        "3",
        "--warmstart-steps",
        "5",
        "--steps",
        "40",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    histograms = json.loads((tmp_path / "staleness.json").read_text())
    assert set(histograms) == {"shard0", "shard1"}
    assert sum(histograms["shard0"].values()) == 2 * 40  # every push of both workers
    rows = [r for r in read_metrics(tmp_path / "metrics.csv") if r["role"] == "worker"]
    assert any(r["staleness"] is not None for r in rows)
    assert (tmp_path / "staleness.png").stat().st_size > 0


def test_dc_asgd_compensates_a_push_after_a_reconnect(shard_cluster):
    lr, dc_lambda = 0.5, 0.25
    addresses = shard_cluster(
        1, "--staleness-policy", "dc-asgd", "--dc-lambda", str(dc_lambda), "--server-lr", str(lr)
    )
    specs = [TensorSpec("w", (64,), torch.float32)]
    generator = torch.Generator().manual_seed(0)
    w_initial, g_other, g = (torch.randn(64, generator=generator) for _ in range(3))

    def connect(worker_id):
        client = ParameterServerClient(addresses, specs, timeout_s=60, worker_id=worker_id)
        client.handshake({torch.float32: w_initial.clone()})
        return client

    first = connect("w")
    fetched = {torch.float32: torch.empty(64)}
    first.pull_now(fetched)  # the parameters w's next gradient is computed from
    first.close()
    other = connect("other")  # never pulled: its push is applied uncompensated
    other.push_now({torch.float32: g_other.clone()})
    other.close()
    again = connect("w")  # a new connection, a new session, the same worker id
    again.push_now({torch.float32: g.clone()})
    again.close()
    reader = connect(None)
    pulled = {torch.float32: torch.empty(64)}
    reader.pull_now(pulled)
    reader.close()

    w_fetched = fetched[torch.float32]
    assert torch.equal(w_fetched, w_initial)
    w_now = w_initial - lr * g_other
    compensated = g + dc_lambda * g * g * (w_now - w_fetched)
    torch.testing.assert_close(pulled[torch.float32], w_now - lr * compensated, rtol=0, atol=1e-6)
    uncompensated = w_now - lr * g
    assert float((pulled[torch.float32] - uncompensated).abs().max()) > 1e-3


def _ahead_and_idle(address: str, **options) -> tuple[dict, tuple[DownpourSGD, DownpourSGD]]:
    """Two workers' models (by name) and optimizers: one that steps ahead, one that never steps."""
    models = {name: _model() for name in ("ahead", "idle")}
    optimizers = [
        DownpourSGD(model.parameters(), lr=0.1, model=model, ps=address, worker_id=name, **options)
        for name, model in models.items()
    ]
    return models, (optimizers[0], optimizers[1])


def test_a_pull_held_too_long_still_lets_close_push_what_the_worker_holds(shard_cluster):
    """A pull held past hold_timeout_s (a worker that never steps holds the others under
    SSP) raises HeldTooLongError, a ShardTimeoutError; the shard answered all along, so the
    close after it still pushes the steps the worker accrued."""
    [address] = shard_cluster(1, "--max-staleness", "1", "--num-workers", "2", "--server-lr", "1")
    models, (ahead, idle) = _ahead_and_idle(
        address, n_push=100, n_pull=100, timeout_s=10, hold_timeout_s=3
    )
    for step in range(5):
        _step(models["ahead"], ahead, _batch(step))
    with pytest.raises(HeldTooLongError, match="pull held for 3s") as held:
        ahead.pull_now()
    assert isinstance(held.value, ShardTimeoutError)
    ahead.close()  # pushes the 5 steps it accrued, held pull or not
    idle.pull_now()
    assert idle.version == 1
    idle.close()


@pytest.mark.parametrize(
    "consistency",
    [("--max-staleness", "1"), ("--sync",)],
    ids=["ssp", "sync"],
)
def test_a_hold_timeout_shorter_than_the_shards_wait_is_kept_and_close_then_pushes(
    shard_cluster, consistency
):
    """A hold_timeout_s shorter than half the request timeout (the longest a shard holds one
    request) was not kept: under SSP the pull was held until the idle worker was declared
    dead (10 s) and no error came; with sync rounds the error came after 15 s, and the close
    after it raised it again instead of pushing what the worker accrued."""
    # The idle worker, heard from only as it joins, must stay live past the hold on a busy
    # machine: the hold ends the wait, not its death.
    flags = ("--num-workers", "2", "--server-lr", "1", "--liveness-timeout", "300")
    [address] = shard_cluster(1, *consistency, *flags)
    models, (ahead, idle) = _ahead_and_idle(
        address, blocking=True, timeout_s=60, hold_timeout_s=1.5
    )
    with pytest.raises(HeldTooLongError, match=r"pull held for 1\.5s"):
        for step in range(5):  # held at its second step (SSP: after it is 1 ahead)
            started = time.monotonic()
            _step(models["ahead"], ahead, _batch(step))
    # Ended by its own bound, well before the shard's wait (30 s, half the request timeout)
    # would have ended it: room for a busy machine.
    assert time.monotonic() - started < 20
    ahead.close()  # the shard is up: what was accrued is pushed, and close says nothing more
    idle.close()
