"""DownpourSGD with a model on a CUDA device against a real shard process: the accrued gradient
stays on the device, only pushes and pulls cross to (pinned) host memory, and the result equals
torch.optim.SGD on the same device."""

import pytest
import torch
from torch import nn

from distbelief.optim import DownpourSGD

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3)).to(device)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, num_steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(num_steps):
        images = torch.randn(16, 10, generator=generator).to("cuda")
        labels = torch.randint(0, 3, (16,), generator=generator).to("cuda")
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("every_steps", [1, 3])
def test_cuda_downpour_equals_torch_sgd(shard_cluster, every_steps):
    addresses = shard_cluster(1, "--server-lr", "0.1")
    model, reference = _model("cuda"), _model("cuda")
    optimizer = DownpourSGD(
        model.parameters(),
        lr=0.1,
        n_push=every_steps,
        n_pull=every_steps,
        model=model,
        ps=addresses,
        blocking=True,
        timeout_s=10,
    )
    assert optimizer.device.type == "cuda"
    assert all(accrued.is_cuda for accrued in optimizer._accrued.values())
    assert all(outbox.is_pinned() for outbox in optimizer._outbox.values())
    assert all(inbox.is_pinned() for inbox in optimizer._inbox.values())
    _train(model, optimizer, 12)
    _train(reference, torch.optim.SGD(reference.parameters(), lr=0.1), 12)
    optimizer.pull_now()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert got.is_cuda
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    optimizer.close()


def test_cuda_async_downpour_loses_no_gradient(shard_cluster):
    """Background pushes and pulls: final = initial - lr * (sum of every gradient computed)."""
    addresses = shard_cluster(1, "--server-lr", "0.1")
    model = _model("cuda")
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = DownpourSGD(
        model.parameters(), lr=0.1, n_push=3, n_pull=2, model=model, ps=addresses, timeout_s=10
    )
    totals = [torch.zeros_like(p) for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        images = torch.randn(16, 10, generator=generator).to("cuda")
        labels = torch.randint(0, 3, (16,), generator=generator).to("cuda")
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        for total, param in zip(totals, model.parameters(), strict=True):
            total += param.grad
        optimizer.step()
    optimizer.flush()
    optimizer.pull_now()
    for param, start, total in zip(model.parameters(), initial, totals, strict=True):
        torch.testing.assert_close(param, start - 0.1 * total, atol=1e-5, rtol=0)
    optimizer.close()


def _downpour_run(shard_cluster, device: str, every_steps: int, **options) -> list[torch.Tensor]:
    """One blocking worker on ``device`` against a fresh shard; its final parameters."""
    addresses = shard_cluster(1, "--server-lr", "0.1")
    model = _model(device)
    optimizer = DownpourSGD(
        model.parameters(),
        lr=0.1,
        n_push=every_steps,
        n_pull=every_steps,
        model=model,
        ps=addresses,
        blocking=True,
        timeout_s=10,
        **options,
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        images = torch.randn(16, 10, generator=generator).to(device)
        labels = torch.randint(0, 3, (16,), generator=generator).to(device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    optimizer.close()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("every_steps", [1, 3])
def test_cuda_downpour_equals_the_cpu_run(shard_cluster, every_steps):
    on_cpu = _downpour_run(shard_cluster, "cpu", every_steps)
    on_cuda = _downpour_run(shard_cluster, "cuda", every_steps)
    for got, want in zip(on_cuda, on_cpu, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cuda_compressed_pushes_lose_no_gradient(shard_cluster):
    """Top-k bf16 pushes made on the device and sent from pinned buffers: after close (which
    pushes the residual whole), the shard holds initial - lr * (sum of every gradient)."""
    addresses = shard_cluster(1, "--server-lr", "0.1")
    model = _model("cuda")
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = DownpourSGD(
        model.parameters(),
        lr=0.1,
        n_push=3,
        n_pull=2,
        model=model,
        ps=addresses,
        timeout_s=10,
        wire_dtype="bf16",
        push_compression="topk:0.05",
    )
    totals = [torch.zeros_like(p) for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        images = torch.randn(16, 10, generator=generator).to("cuda")
        labels = torch.randint(0, 3, (16,), generator=generator).to("cuda")
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        for total, param in zip(totals, model.parameters(), strict=True):
            total += param.grad
        optimizer.step()
    optimizer.close()
    reader = _model("cuda")
    reader_optimizer = DownpourSGD(
        reader.parameters(), lr=0.1, model=reader, ps=addresses, timeout_s=10
    )  # pulls the shard's parameters at full width
    reader_optimizer.close()
    for got, start, total in zip(reader.parameters(), initial, totals, strict=True):
        torch.testing.assert_close(got, start - 0.1 * total, atol=1e-5, rtol=0)
