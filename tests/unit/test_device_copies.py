"""DeviceCopies: the host side of a replica's pushes and pulls. On the CPU its copies are plain
and there is nothing to wait for; on CUDA (tests marked gpu) they are queued on streams and the
returned waits are what make the host buffers safe to send or refill."""

from __future__ import annotations

import pytest
import torch

from distbelief.optim.device_copies import DeviceCopies

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _accrued(device: str) -> dict[torch.dtype, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        torch.float32: torch.randn(1000, generator=generator).to(device),
        torch.float64: torch.randn(10, generator=generator, dtype=torch.float64).to(device),
    }


def test_on_the_cpu_the_copies_are_plain_and_nothing_waits():
    copies = DeviceCopies(torch.device("cpu"))
    accrued = _accrued("cpu")
    expected = {dtype: values.clone() for dtype, values in accrued.items()}
    outbox = copies.host_zeros({dtype: values.numel() for dtype, values in accrued.items()})
    assert not any(buffer.is_pinned() for buffer in outbox.values())
    assert copies.move_out(outbox, accrued) is None
    copies.claim_accrued()
    for dtype in accrued:
        assert torch.equal(outbox[dtype], expected[dtype])
        assert not accrued[dtype].any()
    tensors = [[("a", torch.ones(3))], [("b", torch.zeros(2, dtype=torch.int32))]]
    on_host, ready = copies.to_host(tensors)
    assert ready is None
    assert all(got[0][1] is sent[0][1] for got, sent in zip(on_host, tensors, strict=True))
    params = [torch.zeros(4), torch.zeros(2)]
    copies.load(params, [torch.arange(4.0), torch.ones(2)])
    assert params[0].tolist() == [0.0, 1.0, 2.0, 3.0] and params[1].tolist() == [1.0, 1.0]
    assert copies.inbox_free() is None


@pytest.mark.gpu
@requires_cuda
def test_on_cuda_the_outbox_holds_the_gradient_once_ready_and_accrual_waits():
    copies = DeviceCopies(torch.device("cuda"))
    accrued = _accrued("cuda")
    expected = {dtype: values.cpu() for dtype, values in accrued.items()}
    outbox = copies.host_zeros({dtype: values.numel() for dtype, values in accrued.items()})
    assert all(buffer.is_pinned() for buffer in outbox.values())
    torch.cuda.synchronize()
    ready = copies.move_out(outbox, accrued)
    assert ready is not None
    ready()
    copies.claim_accrued()
    # Accrual after the claim runs after the zeroing on the side stream.
    accrued[torch.float32].add_(1.0)
    for dtype in accrued:
        assert torch.equal(outbox[dtype], expected[dtype])
    assert torch.equal(accrued[torch.float32].cpu(), torch.ones(1000))


@pytest.mark.gpu
@requires_cuda
def test_on_cuda_compressed_tensors_land_in_reused_pinned_buffers():
    copies = DeviceCopies(torch.device("cuda"))
    values = torch.randn(64, device="cuda").to(torch.bfloat16)
    indices = torch.arange(64, device="cuda", dtype=torch.int32)
    first, ready = copies.to_host([[("s#indices", indices), ("s#values", values)]])
    ready()
    assert all(t.is_pinned() and t.device.type == "cpu" for _, t in first[0])
    assert torch.equal(first[0][1][1], values.cpu())
    second, ready = copies.to_host([[("s#indices", indices), ("s#values", values * 2)]])
    ready()
    assert second[0][1][1] is first[0][1][1]  # the same pinned buffer, refilled
    assert torch.equal(second[0][1][1], (values * 2).cpu())


@pytest.mark.gpu
@requires_cuda
def test_on_cuda_a_load_is_queued_and_the_inbox_waits_for_it():
    copies = DeviceCopies(torch.device("cuda"))
    inbox = copies.host_zeros({torch.float32: 1 << 20})[torch.float32]
    inbox.fill_(3.0)
    param = torch.zeros(1 << 20, device="cuda")
    copies.load([param], [inbox])
    free = copies.inbox_free()
    assert free is not None
    free()
    inbox.fill_(5.0)  # refilled only after the copy: the parameter holds the old values
    assert torch.equal(param.cpu(), torch.full((1 << 20,), 3.0))
