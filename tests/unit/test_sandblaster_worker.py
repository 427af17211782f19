"""The Sandblaster worker's portion math: loss and gradient sums of portions of a batch, in
micro-batches, add up to the full batch's (no sockets)."""

import pytest
import torch
from torch import nn

from distbelief.coordinator.batch import BatchPlan
from distbelief.data import load_dataset
from distbelief.models import MLP
from distbelief.optim.sandblaster import add_portion_gradient
from distbelief.sharding import FlatLayout, tensor_specs


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train")


def _model(dataset) -> nn.Module:
    torch.manual_seed(0)
    return MLP(dataset.input_shape, dataset.num_classes, hidden_sizes=(32,)).double()


@pytest.mark.parametrize("batch_size", [None, 300])
def test_the_portions_sums_add_up_to_the_full_batch_mean_gradient_torch_computes(
    digits, batch_size
):
    model = _model(digits)
    plan = BatchPlan(num_examples=len(digits), num_portions=7, batch_size=batch_size, seed=1)
    indices = plan.indices()
    layout = FlatLayout(tensor_specs(model.named_parameters()))
    total = layout.allocate()
    loss_sum = 0.0
    for portion in range(plan.num_portions):
        start, stop = plan.portion_range(portion)
        portion_grads = layout.allocate()
        loss_sum += add_portion_gradient(
            model, digits, indices[start:stop], layout.views(portion_grads), micro_batch_size=50
        )
        torch._foreach_add_(list(total.values()), list(portion_grads.values()))

    images = digits.images[indices].double()
    mean_loss = nn.functional.cross_entropy(model(images), digits.labels[indices])
    mean_loss.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(total[torch.float64] / plan.size, expected, rtol=1e-12, atol=1e-14)
    assert loss_sum / plan.size == pytest.approx(mean_loss.item(), rel=1e-12)


def test_the_model_own_gradients_are_left_alone_and_bad_buffers_are_refused(digits):
    model = _model(digits)
    layout = FlatLayout(tensor_specs(model.named_parameters()))
    grads = layout.allocate()
    add_portion_gradient(model, digits, torch.arange(10), layout.views(grads))
    assert all(p.grad is None for p in model.parameters())
    assert float(grads[torch.float64].abs().sum()) > 0
    with pytest.raises(ValueError, match="one tensor shaped like each parameter"):
        add_portion_gradient(model, digits, torch.arange(10), layout.views(grads)[1:])
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        add_portion_gradient(model, digits, torch.arange(10), [], micro_batch_size=0)
