"""The coordinator's L-BFGS against torch.optim.LBFGS: the same parameter sequence in float64 on
full-batch problems, with the vectors on one shard or split over three, the same stop when the
budget of evaluations runs out, its state saved and restored mid-run, and its round trips per
iteration constant in the history size."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from distbelief.client.vectors import _check_finite as check_finite
from distbelief.coordinator.lbfgs import (
    BUDGET_SPENT,
    ITERATIONS_DONE,
    NOT_FINITE,
    LBFGSSettings,
    SandblasterLBFGS,
)
from distbelief.coordinator.line_search import cubic_minimum
from distbelief.data import load_dataset
from tests.unit.local_vectors import (
    LocalShards,
    batch_evaluator,
    torch_lbfgs,
    torch_lbfgs_sequence,
)

ITERATIONS = 20


def _digits(num_examples: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", split="train")
    inputs = data.images[:num_examples].reshape(num_examples, -1).double()
    return inputs, data.labels[:num_examples]


def _logistic_regression() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(1024, 10).double()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 16), nn.Tanh(), nn.Linear(16, 10)).double()


def _torch_sequence(model, inputs, labels, history, line_search, lr) -> list[torch.Tensor]:
    return torch_lbfgs_sequence(
        model,
        inputs,
        labels,
        history=history,
        line_search=line_search,
        lr=lr,
        iterations=ITERATIONS,
    )


def _coordinator_sequence(
    model, inputs, labels, history, line_search, lr, num_shards, num_portions=1
) -> list[torch.Tensor]:
    shards = LocalShards(model, num_shards)
    evaluate = batch_evaluator(shards, model, inputs, labels, num_portions=num_portions)
    settings = LBFGSSettings(history_size=history, line_search=line_search, lr=lr)
    lbfgs = SandblasterLBFGS(shards, evaluate, settings)
    lbfgs.start()
    sequence = []
    for _ in range(ITERATIONS):
        record = lbfgs.step()
        assert record.stop_reason is None, record
        sequence.append(shards.gather("param")[torch.float64].clone())
    return sequence


CASES = [
    ("logistic", _logistic_regression, "strong_wolfe", 1.0),
    ("logistic", _logistic_regression, None, 0.5),
    ("mlp", _mlp, "strong_wolfe", 1.0),
    ("mlp", _mlp, None, 0.5),
]


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize(("name", "make_model", "line_search", "lr"), CASES)
def test_parameter_sequence_equals_torch_lbfgs(name, make_model, line_search, lr, num_shards):
    inputs, labels = _digits()
    expected = _torch_sequence(make_model(), inputs, labels, 5, line_search, lr)
    ours = _coordinator_sequence(
        make_model(),
        inputs,
        labels,
        5,
        "strong-wolfe" if line_search else "fixed",
        lr,
        num_shards,
    )
    for iteration, (mine, theirs) in enumerate(zip(ours, expected, strict=True), start=1):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-8, msg=f"iteration {iteration}")


def test_forty_portions_over_three_shards_sum_to_the_same_sequence():
    inputs, labels = _digits()
    expected = _torch_sequence(_mlp(), inputs, labels, 5, "strong_wolfe", 1.0)
    ours = _coordinator_sequence(_mlp(), inputs, labels, 5, "strong-wolfe", 1.0, 3, 40)
    for mine, theirs in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)


def _run(lbfgs, shards, iterations) -> list[torch.Tensor]:
    sequence = []
    for _ in range(iterations):
        lbfgs.step()
        sequence.append(shards.gather("param")[torch.float64].clone())
    return sequence


def test_restart_from_saved_state_continues_the_same_sequence():
    inputs, labels = _digits()
    model = _mlp()
    shards = LocalShards(model, 2)
    settings = LBFGSSettings(history_size=3)
    lbfgs = SandblasterLBFGS(shards, batch_evaluator(shards, model, inputs, labels), settings)
    lbfgs.start()
    _run(lbfgs, shards, 6)
    saved_state, saved_shards = json.loads(json.dumps(lbfgs.state_dict())), shards.snapshot()
    uninterrupted = _run(lbfgs, shards, 6)

    shards.restore(saved_shards)
    restarted = SandblasterLBFGS(shards, batch_evaluator(shards, model, inputs, labels), settings)
    restarted.load_state_dict(saved_state)
    resumed = _run(restarted, shards, 6)
    for mine, theirs in zip(resumed, uninterrupted, strict=True):
        assert torch.equal(mine, theirs)


def test_restart_with_other_settings_is_refused():
    shards = LocalShards(_logistic_regression(), 1)
    lbfgs = SandblasterLBFGS(shards, lambda e, p: None, LBFGSSettings(history_size=3))
    with pytest.raises(ValueError, match="history_size"):
        SandblasterLBFGS(shards, lambda e, p: None, LBFGSSettings()).load_state_dict(
            lbfgs.state_dict()
        )


@pytest.mark.parametrize("line_search", ["strong-wolfe", "fixed"])
def test_round_trips_per_iteration_do_not_grow_with_the_history(line_search):
    inputs, labels = _digits(200)
    programs = {}
    for history in (2, 12):
        model = _mlp()
        shards = LocalShards(model, 2)
        settings = LBFGSSettings(history_size=history, line_search=line_search)
        lbfgs = SandblasterLBFGS(shards, batch_evaluator(shards, model, inputs, labels), settings)
        lbfgs.start()
        records = [lbfgs.step() for _ in range(15)]
        # Per evaluation: open and finish; per iteration: history, direction, accept.
        programs[history] = {r.num_programs - 2 * r.num_evaluations for r in records[1:]}
    assert programs[2] == programs[12] == {3}


def test_vectors_no_longer_needed_are_dropped():
    inputs, labels = _digits(200)
    model = _mlp()
    shards = LocalShards(model, 1)
    lbfgs = SandblasterLBFGS(
        shards, batch_evaluator(shards, model, inputs, labels), LBFGSSettings(history_size=3)
    )
    lbfgs.start()
    for _ in range(10):
        lbfgs.step()
    names = set(shards.executors[0].store.names())
    # param, d, trial, the gradient and the previous one, 3 pairs.
    assert len(names) == 5 + 2 * 3, names


def test_stops_when_the_gradient_vanishes():
    inputs, labels = _digits(50)
    model = _logistic_regression()
    shards = LocalShards(model, 1)
    settings = LBFGSSettings(tolerance_grad=1e3)  # any gradient is small enough
    lbfgs = SandblasterLBFGS(shards, batch_evaluator(shards, model, inputs, labels), settings)
    assert lbfgs.start().stop_reason == "gradient below tolerance_grad"
    with pytest.raises(RuntimeError, match="stopped"):
        lbfgs.step()


@pytest.mark.parametrize("line_search", ["strong-wolfe", "fixed"])
def test_a_nan_loss_reports_a_nan_gradient_norm_not_zero_and_stops(line_search):
    """float32, as a job trains: a gradient that is NaN has no norm of 0.0 (which would read
    as converged); and the run stops, diverged: a direction from it would carry NaN
    coefficients, which the shards refuse."""
    inputs, labels = _digits(50)
    inputs = inputs.float()
    inputs[0, 0] = math.nan
    torch.manual_seed(0)
    model = nn.Linear(1024, 10)
    shards = LocalShards(model, 2)
    settings = LBFGSSettings(line_search=line_search)
    lbfgs = SandblasterLBFGS(shards, batch_evaluator(shards, model, inputs, labels), settings)
    record = lbfgs.start()
    assert math.isnan(record.loss)
    assert math.isnan(record.grad_norm), record
    assert record.stop_reason == NOT_FINITE


class _FiniteCoefficientsOnly:
    """The shards as the wire gives them: a program with a NaN or infinite coefficient is
    refused (``LocalShards`` alone would run it)."""

    def __init__(self, shards: LocalShards) -> None:
        self.shards = shards

    def run(self, program):
        check_finite(program.to_json())
        return self.shards.run(program)


@pytest.mark.parametrize("bound", [False, True], ids=["unbounded", "on-the-last-iteration"])
def test_a_step_so_large_that_the_loss_diverges_stops_the_run_with_its_row(bound):
    """--line-search fixed --step-size 1e8: the loss of the step taken is NaN or infinite; the
    direction built from it carried a NaN coefficient, and the coordinator failed with a
    ValueError. A run that diverges on its last allowed iteration says so too (it said
    max_iterations, which a resume with more took for a bound reached, and went on)."""
    line_search = "fixed"
    inputs, labels = _digits(100)
    inputs = inputs.float()  # as a job trains: float32 overflows where float64 would not
    torch.manual_seed(0)
    model = _logistic_regression().float()
    shards = LocalShards(model, 2)
    # It diverges at its fifth iteration (the steps' losses before are finite).
    settings = LBFGSSettings(line_search=line_search, lr=1e8, max_iterations=5 if bound else 20)
    evaluate = batch_evaluator(shards, model, inputs, labels)
    lbfgs = SandblasterLBFGS(_FiniteCoefficientsOnly(shards), evaluate, settings)
    records = [lbfgs.start()]
    while lbfgs.stop_reason is None and len(records) < 10:
        records.append(lbfgs.step())
    assert records[-1].stop_reason == NOT_FINITE, records
    assert (records[-1].iteration, math.isfinite(records[-1].loss)) == (5, False)
    resumed = SandblasterLBFGS(
        _FiniteCoefficientsOnly(shards),
        evaluate,
        LBFGSSettings(line_search=line_search, lr=1e8, max_iterations=8),
    )
    resumed.load_state_dict(json.loads(json.dumps(lbfgs.state_dict())))
    assert resumed.stop_reason == NOT_FINITE


def test_a_gradient_that_is_not_finite_at_a_finite_loss_stops_the_run():
    """The loss finite, the gradient infinite: the run took one more step, to NaN
    parameters, before it stopped."""
    inputs, labels = _digits(50)
    torch.manual_seed(0)
    model = _logistic_regression()
    shards = LocalShards(model, 2)
    scatter = shards.scatter_bundle

    def overflowed(evaluation: int, bundle: str, grads: dict) -> None:
        scatter(
            evaluation,
            bundle,
            {dtype: flat.clone().fill_(math.inf) for dtype, flat in grads.items()},
        )

    shards.scatter_bundle = overflowed  # type: ignore[method-assign]
    evaluate = batch_evaluator(shards, model, inputs, labels)
    lbfgs = SandblasterLBFGS(_FiniteCoefficientsOnly(shards), evaluate, LBFGSSettings())
    record = lbfgs.start()
    assert math.isfinite(record.loss) and record.stop_reason == NOT_FINITE


def _until_stopped(lbfgs: SandblasterLBFGS, max_iterations: int) -> None:
    while lbfgs.stop_reason is None and lbfgs.state.iteration < max_iterations:
        lbfgs.step()


@pytest.mark.parametrize("line_search", ["strong_wolfe", None])
@pytest.mark.parametrize("max_eval", [2, 3, 9, 25])
def test_the_evaluation_budget_stops_where_torch_lbfgs_stops(line_search, max_eval):
    inputs, labels = _digits()
    lr = 1.0 if line_search else 0.5
    model = _mlp()
    optimizer, closure = torch_lbfgs(
        model,
        inputs,
        labels,
        lr=lr,
        max_iter=ITERATIONS,
        max_eval=max_eval,
        history_size=5,
        line_search_fn=line_search,
    )
    optimizer.step(closure)  # one call: max_eval bounds it all
    torch_state = optimizer.state[next(iter(model.parameters()))]

    ours = _mlp()
    shards = LocalShards(ours, 2)
    settings = LBFGSSettings(
        history_size=5,
        lr=lr,
        line_search="strong-wolfe" if line_search else "fixed",
        max_evaluations=max_eval,
    )
    lbfgs = SandblasterLBFGS(shards, batch_evaluator(shards, ours, inputs, labels), settings)
    lbfgs.start()
    _until_stopped(lbfgs, ITERATIONS)

    assert lbfgs.state.iteration == torch_state["n_iter"]
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(shards.gather("param")[torch.float64], expected, rtol=0, atol=1e-8)
    if lbfgs.state.iteration < ITERATIONS:
        assert lbfgs.stop_reason == BUDGET_SPENT
        # A line search may overshoot the budget by one, in torch as here.
        assert lbfgs.state.num_evaluations == torch_state["func_evals"] >= max_eval


def _torch_run(model, inputs, labels, max_iter, max_eval):
    """torch's one ``step()`` with these bounds: its state (n_iter, func_evals)."""
    optimizer, closure = torch_lbfgs(
        model,
        inputs,
        labels,
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_eval,
        history_size=5,
        line_search_fn="strong_wolfe",
    )
    optimizer.step(closure)
    return optimizer.state[next(iter(model.parameters()))]


def test_both_bounds_reached_at_once_stop_for_the_iterations_as_torch_checks_them_first():
    """torch's step() checks ``n_iter == max_iter`` before ``current_evals >= max_eval``."""
    inputs, labels = _digits()
    max_iter = 3
    unbounded = _torch_run(_mlp(), inputs, labels, max_iter, max_eval=10_000)
    max_eval = unbounded["func_evals"]  # what max_iter iterations use: both bounds meet
    model = _mlp()
    torch_state = _torch_run(model, inputs, labels, max_iter, max_eval)
    assert (torch_state["n_iter"], torch_state["func_evals"]) == (max_iter, max_eval)

    ours = _mlp()
    shards = LocalShards(ours, 2)
    settings = LBFGSSettings(history_size=5, max_iterations=max_iter, max_evaluations=max_eval)
    lbfgs = SandblasterLBFGS(shards, batch_evaluator(shards, ours, inputs, labels), settings)
    lbfgs.start()
    _until_stopped(lbfgs, ITERATIONS)

    assert (lbfgs.state.iteration, lbfgs.state.num_evaluations) == (max_iter, max_eval)
    assert lbfgs.stop_reason == ITERATIONS_DONE
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(shards.gather("param")[torch.float64], expected, rtol=0, atol=1e-8)
    # A resumed run with more iterations goes on, and stops at its spent budget.
    more = SandblasterLBFGS(
        shards,
        batch_evaluator(shards, ours, inputs, labels),
        LBFGSSettings(history_size=5, max_iterations=max_iter + 1, max_evaluations=max_eval),
    )
    more.load_state_dict(json.loads(json.dumps(lbfgs.state_dict())))
    assert more.stop_reason == BUDGET_SPENT


def test_a_restart_with_a_larger_budget_goes_on_and_with_a_spent_one_stops():
    inputs, labels = _digits(200)
    model = _mlp()
    shards = LocalShards(model, 1)
    evaluate = batch_evaluator(shards, model, inputs, labels)
    lbfgs = SandblasterLBFGS(shards, evaluate, LBFGSSettings(max_evaluations=4))
    lbfgs.start()
    _until_stopped(lbfgs, ITERATIONS)
    assert lbfgs.stop_reason == BUDGET_SPENT
    saved = json.loads(json.dumps(lbfgs.state_dict()))

    larger = SandblasterLBFGS(shards, evaluate, LBFGSSettings(max_evaluations=8))
    larger.load_state_dict(saved)
    assert larger.stop_reason is None
    _until_stopped(larger, ITERATIONS)
    assert larger.stop_reason == BUDGET_SPENT
    assert larger.state.num_evaluations >= 8

    smaller = SandblasterLBFGS(shards, evaluate, LBFGSSettings(max_evaluations=2))
    smaller.load_state_dict(json.loads(json.dumps(larger.state_dict())))
    assert smaller.stop_reason == BUDGET_SPENT


@pytest.mark.parametrize("diverged_at", [1, 2])
def test_a_line_search_trial_that_diverges_ends_the_search_and_the_run(diverged_at):
    """The loss at a trial of the strong-Wolfe search is infinite: the next trial,
    interpolated from it, was NaN, which the shards refuse (--step-size 1e15 with the search
    failed the job)."""
    inputs, labels = _digits(100)
    torch.manual_seed(0)
    model = _logistic_regression()
    shards = LocalShards(model, 2)
    evaluate = batch_evaluator(shards, model, inputs, labels)
    evaluations: list[int] = []

    def diverging(evaluation: int, point: str):
        sums = evaluate(evaluation, point)
        evaluations.append(evaluation)
        # Evaluation 1 is the start; the search's trials come after.
        if len(evaluations) == 1 + diverged_at:
            return type(sums)(math.inf, sums.num_examples)
        return sums

    settings = LBFGSSettings(line_search="strong-wolfe")
    lbfgs = SandblasterLBFGS(_FiniteCoefficientsOnly(shards), diverging, settings)
    lbfgs.start()
    record = lbfgs.step()
    assert (record.loss, record.num_evaluations) == (math.inf, diverged_at)
    assert record.stop_reason == NOT_FINITE


def test_a_step_size_so_small_its_steps_round_to_zero_runs_without_a_crash():
    """--step-size 1e-320: the first trial steps round to the same float, and the line search's
    cubic divided by their difference (ZeroDivisionError in the coordinator, exit 1). The
    search now takes the bounds' midpoint there, as for a cubic with no minimum; nothing moves,
    and the run goes on to its bound as torch's LBFGS would."""
    inputs, labels = _digits(100)
    model = _logistic_regression()
    shards = LocalShards(model, 1)
    before = shards.gather("param")[torch.float64].clone()
    settings = LBFGSSettings(line_search="strong-wolfe", lr=1e-320, max_iterations=2)
    lbfgs = SandblasterLBFGS(shards, batch_evaluator(shards, model, inputs, labels), settings)
    records = [lbfgs.start()]
    while lbfgs.stop_reason is None and len(records) < 5:
        records.append(lbfgs.step())
    assert all(math.isfinite(record.loss) for record in records), records
    assert torch.allclose(shards.gather("param")[torch.float64], before, rtol=0, atol=1e-300)


@pytest.mark.parametrize(
    ("x2", "f2"), [(0.0, 0.9), (5e-324, 0.9), (1e-300, 0.5)], ids=["same", "subnormal", "tiny"]
)
def test_the_cubic_of_steps_too_close_to_tell_apart_gives_a_step_between_them(x2, f2):
    # Their difference is 0, or so small that the cubic's terms overflow or are NaN.
    step = cubic_minimum(0.0, 1.0, -1.0, x2, f2, -1.0)
    assert math.isfinite(step) and 0.0 <= step <= x2
