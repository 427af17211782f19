"""Compressed pushes and pulls against real shards served on 127.0.0.1 from this process:
digits trained with bf16 and with top-k 1% pushes reach 90% on the shards' parameters, top-k
with error feedback loses no gradient, and the bytes counted are the compressed ones."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.client.compression import PushCompressor
from distbelief.config import DataConfig, JobConfig
from distbelief.data import load_job_dataset
from distbelief.evaluator.accuracy import evaluate
from distbelief.models import build_model
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.sharding import FlatLayout, FlatPartitioner, TensorSpec, tensor_specs
from distbelief.wire import serve
from distbelief.wire.compression import WireCompression
from distbelief.worker import run_worker


@contextlib.contextmanager
def _shards(
    num_shards: int, lr: float, optimizer: str = "sgd"
) -> Iterator[tuple[list[str], list[ShardService]]]:
    """Shards (plain SGD by default) served from this process: their addresses and
    services."""
    servers, services = [], []
    try:
        for shard_id in range(num_shards):
            factory = server_optimizer_factory(optimizer, lr=lr)
            shard = ParameterShard(shard_id, num_shards, factory)
            services.append(ShardService(shard))
            servers.append(serve("tcp://127.0.0.1:0", services[-1]))
        yield [server.address for server in servers], services
    finally:
        for server in servers:
            server.stop()


def _read_shards(addresses: list[str], model: nn.Module) -> None:
    """Load the shards' parameters into ``model``, pulled at full width."""
    named = list(model.named_parameters())
    layout = FlatLayout(tensor_specs(named))
    client = ParameterServerClient(addresses, layout.specs, timeout_s=30, retry_timeout_s=0)
    try:
        flat = layout.allocate()
        client.handshake(None)
        client.pull_now(flat)
    finally:
        client.close()
    with torch.no_grad():
        for (_, param), value in zip(named, layout.views(flat), strict=True):
            param.copy_(value)


@pytest.mark.parametrize(
    ("wire_dtype", "push_compression"), [("bf16", "none"), ("fp32", "topk:0.01")]
)
def test_digits_reach_90_percent_with_compressed_pushes(wire_dtype, push_compression):
    train_set = load_job_dataset(DataConfig(name="digits"), "train")
    test_set = load_job_dataset(DataConfig(name="digits"), "test")
    torch.manual_seed(0)
    model = build_model("mlp", train_set.input_shape, train_set.num_classes)
    generator = torch.Generator().manual_seed(0)
    with _shards(2, lr=0.1) as (addresses, _):
        # Blocking: one worker's run is the same every time, so the margin is the same too.
        optimizer = DownpourSGD(
            model.parameters(),
            lr=0.1,
            model=model,
            ps=addresses,
            blocking=True,
            timeout_s=30,
            wire_dtype=wire_dtype,
            push_compression=push_compression,
        )
        steps = 0
        while steps < 250:
            order = torch.randperm(len(train_set), generator=generator)
            for start in range(0, len(order) - 31, 32):
                batch = order[start : start + 32]
                optimizer.zero_grad()
                logits = model(train_set.images[batch])
                nn.functional.cross_entropy(logits, train_set.labels[batch]).backward()
                optimizer.step()
                steps += 1
                if steps == 250:
                    break
        optimizer.close()
        _read_shards(addresses, model)
    assert evaluate(model, test_set)[1] >= 0.9


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))


def test_async_top_k_pushes_lose_no_gradient():
    """Background top-k bf16 pushes and pulls: after close, the shards hold exactly what
    full-width pushes of every gradient would have given (the residual went out at close)."""
    model = _small_model()
    initial = [p.detach().clone() for p in model.parameters()]
    totals = [torch.zeros_like(p) for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    with _shards(2, lr=0.1) as (addresses, _):
        optimizer = DownpourSGD(
            model.parameters(),
            lr=0.1,
            n_push=3,
            n_pull=2,
            model=model,
            ps=addresses,
            timeout_s=30,
            wire_dtype="bf16",
            push_compression="topk:0.05",
        )
        for _ in range(20):
            optimizer.zero_grad()
            images = torch.randn(16, 10, generator=generator)
            labels = torch.randint(0, 3, (16,), generator=generator)
            nn.functional.cross_entropy(model(images), labels).backward()
            for total, param in zip(totals, model.parameters(), strict=True):
                total += param.grad
            optimizer.step()
        optimizer.flush()
        optimizer.pull_now()
        optimizer.close()
        reader = _small_model()
        _read_shards(addresses, reader)
    for got, start, total in zip(reader.parameters(), initial, totals, strict=True):
        torch.testing.assert_close(got.detach(), start - 0.1 * total, atol=1e-5, rtol=0)
    # The worker's own pull travelled in bf16: its values are the shards' rounded.
    for pulled, got in zip(model.parameters(), reader.parameters(), strict=True):
        assert torch.equal(pulled.detach(), got.detach().to(torch.bfloat16).float())


def test_the_bytes_counted_are_the_compressed_ones(monkeypatch):
    """A worker run by the job's config: its metric records and the shards' counters count
    bf16 pulls and top-k pushes (int32 index + bf16 value per element sent); after top-k
    pushes to plain-SGD shards, each pull brings only what the last push changed."""
    # Bytes on the wire: over TCP (on one host, close's full-width push of the residual
    # would go through shared memory and carry none).
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    config = JobConfig.from_fields(
        {
            "cluster.num_workers": 1,
            "cluster.num_shards": 2,
            "model.name": "mlp",
            "optimizer.steps": 10,
            "optimizer.blocking": True,
            "optimizer.wire_dtype": "bf16",
            "optimizer.push_compression": "topk:0.01",
            "reporting.log_every_steps": 5,
            "faults.timeout_s": 30.0,
        }
    )
    records = []
    with _shards(2, lr=0.05) as (addresses, services):
        run_worker(
            config,
            0,
            addresses,
            emit=lambda kind, payload: records.append(payload) if kind == "metric" else None,
            start_time=time.time(),
        )
        received = sum(service.bytes_received for service in services)
        sent = sum(service.bytes_sent for service in services)
    named = list(build_model("mlp", (1, 32, 32), 10).named_parameters())
    numel = sum(p.numel() for _, p in named)
    slices = FlatPartitioner().partition(tensor_specs(named), 2)
    sent_per_push = sum(-(-piece.numel // 100) * (4 + 2) for pieces in slices for piece in pieces)
    assert sent_per_push < numel * 4 * 0.02
    second = records[1]  # steps 6..10: five blocking pushes and pulls, and close's push
    # The last record counts close's full-width push of the residual too: the worker pushes it
    # before it reports its last step.
    assert second["bytes_pushed"] == 5 * sent_per_push + numel * 4
    # Each pull: the elements the one push before it changed, index and bf16 value each.
    assert second["bytes_pulled"] == 5 * sent_per_push
    # The shards count the same: ten top-k pushes and close's full-width one of the residual;
    # the first pull whole, then one of changes per step.
    assert received == 10 * sent_per_push + numel * 4
    assert sent == numel * 2 + 10 * sent_per_push


def _metrics_into(records: list[dict]) -> Callable[[str, dict], None]:
    """An ``emit`` for ``run_worker`` that keeps its metric records in ``records``."""

    def emit(kind: str, payload: dict) -> None:
        if kind == "metric":
            records.append(payload)

    return emit


@pytest.mark.parametrize(
    ("model", "push_compression"),
    [("mlp", "none"), ("mlp", "topk:0.01"), ("dlrm", "none"), ("dlrm", "topk:0.01")],
)
def test_a_workers_records_count_every_byte_it_pushed(monkeypatch, model, push_compression):
    """Asynchronous pushes (the last one still in flight when the loop ends) and close's push
    of the residual (dense, and a click model's rows): the sum of a worker's bytes_pushed over
    its records is what the shards received, whether its last step ends a window or not."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")  # bytes through the shards' sockets
    data = {"data.name": "synthetic-ctr", "data.table_size": 200} if model == "dlrm" else {}
    with _shards(2, lr=0.05) as (addresses, services):
        for steps in (1, 10, 12):  # log_every_steps is 5: the last step ends a window, or not
            config = JobConfig.from_fields(
                {
                    "cluster.num_workers": 1,
                    "cluster.num_shards": 2,
                    "model.name": model,
                    **data,
                    "optimizer.steps": steps,
                    "optimizer.push_compression": push_compression,
                    "reporting.log_every_steps": 5,
                    "faults.timeout_s": 30.0,
                }
            )
            # The first run's INIT of the shards is no push; later runs find them initialised.
            received_before = sum(service.bytes_received for service in services)
            records: list[dict] = []
            run_worker(config, 0, addresses, emit=_metrics_into(records), start_time=time.time())
            received = sum(service.bytes_received for service in services) - received_before
            if steps > 1:
                assert records[-1]["step"] == steps
                assert sum(record["bytes_pushed"] for record in records) == received, steps


def test_pulls_of_changes_only_leave_the_worker_exactly_where_whole_pulls_would():
    """Blocking top-k bf16 pushes to plain-SGD and Adagrad shards: after every step, the
    worker's pulled values (changes applied onto what it held) equal a whole bf16 pull of the
    shards' parameters, bit for bit, and its pulls carried a fraction of the model."""
    for optimizer_name in ("sgd", "adagrad"):
        model = _small_model()
        numel = sum(p.numel() for p in model.parameters())
        generator = torch.Generator().manual_seed(2)
        with _shards(2, lr=0.1, optimizer=optimizer_name) as (addresses, _):
            optimizer = DownpourSGD(
                model.parameters(),
                lr=0.1,
                n_push=2,
                n_pull=3,
                model=model,
                ps=addresses,
                blocking=True,
                timeout_s=30,
                wire_dtype="bf16",
                push_compression="topk:0.02",
            )
            reader = _small_model()
            layout = FlatLayout(tensor_specs(list(reader.named_parameters())))
            whole = ParameterServerClient(
                addresses, layout.specs, timeout_s=30, pull_dtype=torch.bfloat16
            )
            whole.handshake(None)
            flat = layout.allocate()
            optimizer.client.take_wire_figures()
            for step in range(1, 25):
                optimizer.zero_grad()
                images = torch.randn(16, 10, generator=generator)
                labels = torch.randint(0, 3, (16,), generator=generator)
                nn.functional.cross_entropy(model(images), labels).backward()
                optimizer.step()
                if step % 3 == 0:  # just pulled: nothing of the worker's own on top yet
                    whole.pull_now(flat)
                    assert all(
                        torch.equal(optimizer._inbox[dtype], flat[dtype]) for dtype in flat
                    ), f"{optimizer_name}, step {step}"
            pulled = optimizer.client.take_wire_figures()["bytes_pulled"]
            whole.close()
            optimizer.close()
        assert pulled < 8 * numel * 2 * 0.2  # 8 pulls, each under a fifth of a whole one


def test_a_pull_is_whole_after_a_restart_or_into_other_buffers():
    """What a worker holds is named by the shard's life: a shard that is another life now (a
    restart) answers with everything, as it does a pull into buffers the last pull did not
    fill; the values are right either way."""
    specs = [TensorSpec("w", (1000,), torch.float32)]
    with _shards(1, lr=1.0) as (addresses, services):
        client = ParameterServerClient(addresses, specs, timeout_s=30, pull_changes=True)
        reader = ParameterServerClient(addresses, specs, timeout_s=30)
        try:
            client.handshake({torch.float32: torch.zeros(1000)})
            inbox = {torch.float32: torch.zeros(1000)}
            top_2 = PushCompressor(WireCompression(topk_fraction=0.002), client.slices)

            def pushed_then_pulled(into) -> int:
                grad = torch.zeros(1000)
                grad[[3, 500]] = 1.0
                client.wait(client.push(top_2.encode({torch.float32: grad})))
                client.take_wire_figures()
                client.pull_now(into)
                return int(client.take_wire_figures()["bytes_pulled"])

            client.pull_now(inbox)
            client.pull_now(inbox)  # the shard now keeps track of changes
            assert pushed_then_pulled(inbox) < 100  # two changed elements
            services[0].shard.life = "another life"
            assert pushed_then_pulled(inbox) == 4000
            assert pushed_then_pulled(inbox) < 100
            other = {torch.float32: torch.zeros(1000)}
            assert pushed_then_pulled(other) == 4000
            whole = {torch.float32: torch.empty(1000)}
            reader.pull_now(whole)
            assert torch.equal(other[torch.float32], whole[torch.float32])
            client.pull_now(inbox)  # the last pull filled other buffers: whole again
            assert torch.equal(inbox[torch.float32], whole[torch.float32])
        finally:
            client.close()
            reader.close()


def test_a_push_waits_for_ready_before_sending_and_a_pull_before_refilling():
    """``ready`` runs on each shard's lane before its request: a push sends what the buffer
    holds after it (a device copy landing late), a pull refills the buffer only after it."""
    specs = [TensorSpec("w", (100,), torch.float32)]
    with _shards(2, lr=1.0) as (addresses, _):
        client = ParameterServerClient(addresses, specs, timeout_s=30, retry_timeout_s=0)
        try:
            client.handshake({torch.float32: torch.zeros(100)})
            outbox = {torch.float32: torch.zeros(100)}
            client.wait(client.push(outbox, ready=lambda: outbox[torch.float32].fill_(2.0)))
            inbox = {torch.float32: torch.full((100,), 9.0)}
            seen: list[torch.Tensor] = []
            client.wait(client.pull(inbox, ready=lambda: seen.append(inbox[torch.float32].clone())))
        finally:
            client.close()
    # Once per shard, each before its own request: the first before any was answered.
    assert len(seen) == 2 and torch.equal(seen[0], torch.full((100,), 9.0))
    assert torch.equal(inbox[torch.float32], torch.full((100,), -2.0))
