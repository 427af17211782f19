"""Row optimizers against torch.optim on nn.Embedding(sparse=True), and row-wise Adagrad
against a reference loop."""

from __future__ import annotations

import pytest
import torch

from distbelief.server.row_optimizers import (
    LazyAdam,
    RowAdagrad,
    RowOptimizer,
    RowSGD,
    RowWiseAdagrad,
)

NUM_ROWS, DIM, NUM_STEPS, BATCH = 50, 6, 10, 40

# torch.optim.Adagrad builds sparse tensors without invariant checks and says so.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def _batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ids (with duplicates, only part of the table) and regression targets."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, min(NUM_ROWS, 20 + 4 * step), (BATCH,), generator=generator),
            torch.randn(BATCH, DIM, generator=generator),
        )
        for step in range(NUM_STEPS)
    ]


def _loss(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((rows - targets) ** 2).sum() + rows.sum() ** 2 * 0.01


def _run_reference(optimizer_factory, initial: torch.Tensor, batches) -> torch.Tensor:
    embedding = torch.nn.Embedding(NUM_ROWS, DIM, sparse=True)
    with torch.no_grad():
        embedding.weight.copy_(initial)
    optimizer = optimizer_factory([embedding.weight])
    for ids, targets in batches:
        optimizer.zero_grad()
        _loss(embedding(ids), targets).backward()
        optimizer.step()
    return embedding.weight.detach()


def _run_rows(optimizer: RowOptimizer, initial: torch.Tensor, batches) -> torch.Tensor:
    """A dense stand-in for the table: gather, sum duplicates, apply, write back."""
    values = initial.clone()
    state = {
        name: torch.full((NUM_ROWS, *shape), optimizer.initial_state(name))
        for name, shape in optimizer.state_shapes(DIM).items()
    }
    for step, (ids, targets) in enumerate(batches, start=1):
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = values[unique].requires_grad_()
        _loss(rows[inverse], targets).backward()  # rows.grad: duplicates summed
        gathered = rows.detach().clone()
        gathered_state = {name: tensor[unique] for name, tensor in state.items()}
        optimizer.apply(gathered, gathered_state, rows.grad, step)
        values[unique] = gathered
        for name, tensor in gathered_state.items():
            state[name][unique] = tensor
    return values


@pytest.mark.parametrize(
    ("ours", "reference"),
    [
        (RowSGD(0.05), lambda params: torch.optim.SGD(params, lr=0.05)),
        (RowAdagrad(0.1), lambda params: torch.optim.Adagrad(params, lr=0.1)),
        (
            RowAdagrad(0.1, eps=1e-3, initial_accumulator_value=0.5),
            lambda params: torch.optim.Adagrad(
                params, lr=0.1, eps=1e-3, initial_accumulator_value=0.5
            ),
        ),
        (LazyAdam(0.05), lambda params: torch.optim.SparseAdam(params, lr=0.05)),
        (
            LazyAdam(0.02, betas=(0.5, 0.9), eps=1e-6),
            lambda params: torch.optim.SparseAdam(params, lr=0.02, betas=(0.5, 0.9), eps=1e-6),
        ),
    ],
    ids=["sgd", "adagrad", "adagrad-init", "lazy-adam", "lazy-adam-betas"],
)
def test_parity_with_torch_optim(ours, reference):
    initial = torch.randn(NUM_ROWS, DIM, generator=torch.Generator().manual_seed(1))
    batches = _batches(seed=2)
    expected = _run_reference(reference, initial, batches)
    got = _run_rows(ours, initial, batches)
    assert not torch.equal(expected, initial)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_rowwise_adagrad_matches_reference_loop():
    lr, eps = 0.1, 1e-8
    initial = torch.randn(NUM_ROWS, DIM, generator=torch.Generator().manual_seed(3))
    batches = _batches(seed=4)
    got = _run_rows(RowWiseAdagrad(lr, eps), initial, batches)

    values = initial.double().clone()
    accumulators = [0.0] * NUM_ROWS
    for ids, targets in batches:
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = values[unique].float().requires_grad_()
        _loss(rows[inverse], targets).backward()
        for position, row_id in enumerate(unique.tolist()):
            grad = rows.grad[position].double()
            accumulators[row_id] += sum(g * g for g in grad.tolist()) / DIM
            values[row_id] -= lr * grad / (accumulators[row_id] ** 0.5 + eps)
    torch.testing.assert_close(got, values.float(), atol=1e-5, rtol=1e-5)


def test_untouched_rows_keep_values_and_state():
    optimizer = LazyAdam(0.1)
    values = torch.ones(2, 3)
    state = {"exp_avg": torch.zeros(2, 3), "exp_avg_sq": torch.zeros(2, 3)}
    optimizer.apply(values[:1], {name: t[:1] for name, t in state.items()}, torch.ones(1, 3), 1)
    assert torch.equal(values[1], torch.ones(3))
    assert torch.equal(state["exp_avg"][1], torch.zeros(3))


def test_state_shapes():
    assert RowSGD(0.1).state_shapes(4) == {}
    assert RowAdagrad(0.1).state_shapes(4) == {"sum": (4,)}
    assert RowWiseAdagrad(0.1).state_shapes(4) == {"sum": (1,)}
    assert LazyAdam().state_shapes(4) == {"exp_avg": (4,), "exp_avg_sq": (4,)}
    assert RowAdagrad(0.1, initial_accumulator_value=0.25).initial_state("sum") == 0.25


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RowSGD(-1.0), "lr"),
        (lambda: RowAdagrad(0.1, eps=0.0), "eps"),
        (lambda: RowAdagrad(0.1, initial_accumulator_value=-1.0), "initial_accumulator_value"),
        (lambda: RowWiseAdagrad(0.1, eps=-1.0), "eps"),
        (lambda: LazyAdam(betas=(0.9, 1.0)), "betas"),
    ],
)
def test_bad_hyperparameters(build, message):
    with pytest.raises(ValueError, match=message):
        build()
