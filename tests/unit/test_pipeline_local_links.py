"""In-process links between stages: copies, byte counts, timeouts, missing sides, closing."""

from __future__ import annotations

import threading

import pytest
import torch

from distbelief.errors import StageTimeoutError, StageUnavailableError
from distbelief.pipeline.local_links import local_links


def test_activations_and_gradients_cross_each_boundary_as_copies():
    first, middle, last = local_links(3)
    activation = torch.ones(2, 3)
    first.send_forward(5, 0, activation)
    activation.add_(1)  # the receiver holds what was sent, not the sender's tensor
    assert torch.equal(middle.recv_forward(5, 0, timeout_s=10.0), torch.ones(2, 3))
    middle.send_forward(5, 0, torch.zeros(4, dtype=torch.float64))
    assert last.recv_forward(5, 0, timeout_s=10.0).dtype == torch.float64
    last.send_backward(5, 0, torch.full((4,), 2.0))
    assert torch.equal(middle.recv_backward(5, 0, timeout_s=10.0), torch.full((4,), 2.0))
    middle.send_backward(5, 0, torch.zeros(2, 3))
    assert first.recv_backward(5, 0, timeout_s=10.0).shape == (2, 3)

    assert (first.counters.bytes_sent, first.counters.bytes_received) == (24, 24)
    assert (middle.counters.bytes_sent, middle.counters.bytes_received) == (32 + 24, 24 + 16)
    assert (last.counters.bytes_sent, last.counters.bytes_received) == (16, 32)


def test_messages_are_matched_by_step_and_micro_batch():
    first, last = local_links(2)
    for step, micro in [(1, 1), (2, 0), (1, 0)]:
        first.send_forward(step, micro, torch.tensor([10.0 * step + micro]))
    for step, micro in [(1, 0), (1, 1), (2, 0)]:
        received = last.recv_forward(step, micro, timeout_s=10.0)
        assert received.item() == 10.0 * step + micro


def test_a_receive_that_waits_gets_the_tensor_once_sent():
    first, last = local_links(2)
    sender = threading.Timer(0.05, first.send_forward, (0, 0, torch.ones(1)))
    sender.start()
    assert last.recv_forward(0, 0, timeout_s=30.0).item() == 1.0
    sender.join()


def test_a_missing_message_times_out_naming_stage_step_and_micro_batch():
    first, last = local_links(2)
    message = r"stage 1 received no activation of step 3 micro-batch 2 from stage 0 within"
    with pytest.raises(StageTimeoutError, match=message):
        last.recv_forward(3, 2, timeout_s=0.05)
    with pytest.raises(StageTimeoutError, match=r"stage 0 received no gradient of step 3"):
        first.recv_backward(3, 0, timeout_s=0.05)


def test_the_missing_side_of_an_end_stage_is_a_runtime_error():
    first, last = local_links(2)
    with pytest.raises(RuntimeError, match="stage 0 has no stage to receive an activation"):
        first.recv_forward(0, 0, timeout_s=1.0)
    with pytest.raises(RuntimeError, match="stage 0 has no stage to send a gradient"):
        first.send_backward(0, 0, torch.ones(1))
    with pytest.raises(RuntimeError, match="stage 1 has no stage to send an activation"):
        last.send_forward(0, 0, torch.ones(1))
    with pytest.raises(RuntimeError, match="stage 1 has no stage to receive a gradient"):
        last.recv_backward(0, 0, timeout_s=1.0)
    (alone,) = local_links(1)
    with pytest.raises(RuntimeError):
        alone.send_forward(0, 0, torch.ones(1))


def test_closing_wakes_a_waiting_neighbour_and_ends_the_links():
    first, last = local_links(2)
    first.send_forward(0, 0, torch.ones(1))
    closer = threading.Timer(0.05, first.close)
    closer.start()
    with pytest.raises(StageUnavailableError, match="stage 0 has closed its links"):
        last.recv_forward(0, 1, timeout_s=30.0)
    closer.join()
    # What was sent before closing can still be received.
    assert last.recv_forward(0, 0, timeout_s=1.0).item() == 1.0
    with pytest.raises(StageUnavailableError):
        last.send_backward(0, 0, torch.ones(1))
    with pytest.raises(RuntimeError, match="links of stage 0 are closed"):
        first.send_forward(0, 1, torch.ones(1))
    first.close()


@pytest.mark.parametrize("num_stages", [0, 1.5, True, "2"])
def test_a_num_stages_that_is_no_count_is_refused(num_stages):
    with pytest.raises(ValueError, match=f"num_stages must be an integer >= 1, got {num_stages!r}"):
        local_links(num_stages)
