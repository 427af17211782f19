"""The worker loop's per-step hooks, device and wire figures, against real shards served on
127.0.0.1 from the test process: a hook sees every step, one that stops early stops the loop,
and the records count every byte pulled, a pull still in flight at the last step's too."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from distbelief.config import JobConfig
from distbelief.server import ParameterShard, ShardService
from distbelief.server.optimizers import server_optimizer_from_config
from distbelief.server.process import serve_shard
from distbelief.wire import serve
from distbelief.worker import StepHook, StepInfo, run_worker
from tests.conftest import StopAt
from tests.netproxy import FaultProxy

CONFIG = JobConfig.from_fields(
    {
        "cluster.num_workers": 1,
        "cluster.num_shards": 1,
        "optimizer.steps": 12,
        "reporting.log_every_steps": 5,
        "faults.timeout_s": 10.0,
    }
)


@pytest.fixture
def address() -> Iterator[str]:
    """One shard of CONFIG's job, served until the test ends."""
    ready = threading.Event()
    stop = threading.Event()
    found: list[str] = []

    def emit(kind: str, payload: dict) -> None:
        if kind == "ready":
            found.append(payload["address"])
            ready.set()

    thread = threading.Thread(
        target=serve_shard,
        args=(0, 1, "tcp://127.0.0.1:0"),
        kwargs={
            "optimizer_factory": server_optimizer_from_config(CONFIG.server),
            "emit": emit,
            "stop": stop,
        },
        daemon=True,
    )
    thread.start()
    assert ready.wait(60), "the shard did not start"
    yield found[0]
    stop.set()
    thread.join(30)


class Recorder:
    def __init__(self) -> None:
        self.steps: list[StepInfo] = []

    def after_step(self, step: StepInfo) -> None:
        self.steps.append(step)


def _train(address: str, *hooks: StepHook, **options) -> tuple[dict, list[tuple]]:
    events: list[tuple] = []
    result = run_worker(
        CONFIG,
        0,
        [address],
        emit=lambda kind, payload: events.append((kind, payload)),
        hooks=hooks,
        **options,
    )
    return result, events


def test_a_hook_sees_every_step(address: str) -> None:
    recorder = Recorder()
    result, events = _train(address, recorder)
    assert result == {"rank": 0, "steps": 12}
    assert [s.step for s in recorder.steps] == list(range(1, 13))
    assert all(s.batch_size == CONFIG.optimizer.minibatch_size for s in recorder.steps)
    assert all(s.compute_s > 0 and s.loss > 0 for s in recorder.steps)
    # Every 5 steps, and the last 2 steps as a window of their own: the final step is on
    # record (in metrics.csv and the launcher's last progress line).
    assert [p["step"] for kind, p in events if kind == "metric"] == [5, 10, 12]


def test_a_hook_that_stops_stops_the_loop_and_every_hook_sees_that_step(address: str) -> None:
    recorder = Recorder()
    result, _ = _train(address, StopAt(7), recorder)
    assert result["steps"] == 7
    assert [s.step for s in recorder.steps] == list(range(1, 8))


def test_a_resumed_worker_counts_on_from_its_step(address: str) -> None:
    recorder = Recorder()
    result, _ = _train(address, recorder, resume_step=9)
    assert result["steps"] == 12
    assert [s.step for s in recorder.steps] == [10, 11, 12]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(address: str) -> None:
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        _train(address, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda(address: str) -> None:
    recorder = Recorder()
    result, _ = _train(address, recorder, device="cuda")
    assert result["steps"] == 12 and len(recorder.steps) == 12


class DelayFrom:
    """Adds ``delay_s`` to every byte through ``proxy`` from step ``step`` on."""

    def __init__(self, proxy: FaultProxy, step: int, delay_s: float) -> None:
        self.proxy, self.step, self.delay_s = proxy, step, delay_s

    def after_step(self, step: StepInfo) -> None:
        if step.step == self.step:
            self.proxy.set_delay(self.delay_s)


def test_the_records_count_a_pull_still_in_flight_after_the_last_step(monkeypatch) -> None:
    """A non-blocking worker starts a pull at every step; the last one's reply, slowed by the
    network, arrives after the last push is applied: the last record counts it too, so the
    records add up to every byte the shard sent."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")  # bytes on the wire, through the proxy
    service = ShardService(ParameterShard(0, 1, server_optimizer_from_config(CONFIG.server)))
    server = serve("tcp://127.0.0.1:0", service)
    events: list[tuple] = []
    try:
        with FaultProxy(server.address) as proxy:
            result = run_worker(
                CONFIG,
                0,
                [proxy.address],
                emit=lambda kind, payload: events.append((kind, payload)),
                hooks=[DelayFrom(proxy, CONFIG.optimizer.steps - 1, delay_s=0.5)],
            )
    finally:
        server.stop()
    assert result["steps"] == CONFIG.optimizer.steps
    records = [payload for kind, payload in events if kind == "metric"]
    assert sum(record["bytes_pulled"] for record in records) == service.bytes_sent
