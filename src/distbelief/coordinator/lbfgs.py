"""Sandblaster L-BFGS's coordinator: L-BFGS on scalars, its vectors kept on the shards.

The algorithm is ``torch.optim.LBFGS``'s (same direction, step sizes, line search, stopping
rules and budget of objective evaluations; the caller bounds the iterations), in the
vector-free form of Chen et al. 2014: the coordinator keeps the dot products of
the base vectors (the history pairs ``s_i``, ``y_i`` and the gradient), runs the two-loop
recursion on that small matrix, and has the shards build the direction as one linear
combination. Each iteration is a constant number of programs, whatever the history size.
Every vector is named; this module holds names and scalars only, never a parameter vector.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from distbelief.config import LINE_SEARCHES
from distbelief.coordinator.line_search import DivergedTrial, LineSearchResult, strong_wolfe
from distbelief.wire.vector_program import Program

logger = logging.getLogger(__name__)

PARAM = "param"
"""The shards' parameter vector: the current point."""
DIRECTION = "d"
TRIAL = "trial"
"""Where a line search's trial point ``param + t d`` is built for the workers to evaluate."""
BUDGET_SPENT = "max_evaluations reached"
"""The stop reason of a run that made its budget of evaluations: the one a resumed run with a
larger budget (or none) takes back."""
ITERATIONS_DONE = "max_iterations"
"""The stop reason of a run that made its iterations: one a resumed run with more takes back."""
NOT_FINITE = "loss or gradient not finite"
"""The stop reason of a run whose loss or gradient became NaN or infinite (it diverged: a
smaller ``--step-size``, say, is another run)."""
RESUMABLE_STOPS = (None, ITERATIONS_DONE, BUDGET_SPENT)
"""The stop reasons a resumed run may go on from (with a bound raised); the others (a
tolerance met, a diverged loss) are for good."""
LINE_SEARCH_EVALUATIONS = 25
"""A line search's evaluations without a budget (torch's ``max_ls`` default)."""
CURVATURE_EPS = 1e-10
"""A pair (s, y) enters the history only when ``y . s`` exceeds this (torch's rule)."""


class VectorSpace(Protocol):
    """The shards' named vectors: runs one program on every shard, returns combined results."""

    def run(self, program: Program) -> list[Any]: ...


class Evaluation(Protocol):
    """What evaluating the objective at a point returned: sums over the batch."""

    loss_sum: float
    num_examples: int


Evaluate = Callable[[int, str], Evaluation]
"""``evaluate(evaluation, point)``: the workers add the batch's gradient sum at the vector
``point`` into the vector the evaluation was opened on (``open_evaluation``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LBFGSSettings:
    """torch.optim.LBFGS's knobs, under their torch names where they have one."""

    history_size: int = 10
    """Pairs (s, y) kept: m in Nocedal and Wright."""
    lr: float = 1.0
    """Step of the fixed-step mode, and the first trial step of the line search."""
    line_search: str = "strong-wolfe"
    """``strong-wolfe`` or ``fixed``."""
    tolerance_grad: float = 1e-7
    """Stop when the gradient's largest entry is at most this."""
    tolerance_change: float = 1e-9
    """Stop when the loss or the step changes less than this."""
    max_iterations: int | None = None
    """torch's ``max_iter``: L-BFGS stops after this many iterations. None: no bound."""
    max_evaluations: int | None = None
    """torch's ``max_eval``: objective evaluations in all, the first included (torch counts them
    per ``step()`` call; here one run is one call). L-BFGS stops after the iteration that
    reaches this many, and a line search is bounded by the rest (torch's ``max_ls``: its first
    trial is always made, and it may make one past the bound, as torch's does). None: no
    budget, and a line search makes at most ``LINE_SEARCH_EVALUATIONS``."""

    def __post_init__(self) -> None:
        if self.max_iterations is not None and self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if self.max_evaluations is not None and self.max_evaluations < 1:
            raise ValueError(f"max_evaluations must be >= 1, got {self.max_evaluations}")
        if self.history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {self.history_size}")
        if self.line_search not in LINE_SEARCHES:
            raise ValueError(
                f"line_search must be one of {LINE_SEARCHES}, got {self.line_search!r}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class IterationRecord:
    """What one iteration did (iteration 0: the first evaluation, at the start point)."""

    iteration: int
    loss: float
    grad_norm: float
    """L2 norm of the batch gradient at the new point."""
    grad_max_abs: float
    step_size: float
    num_evaluations: int
    """Objective evaluations this iteration (line search included)."""
    num_programs: int
    """Coordinator-to-shard round trips this iteration (evaluations' commits excluded)."""
    dead: list[str] = field(default_factory=list)
    """Vectors made here that are no longer needed, dropped with the next program."""
    stop_reason: str | None = None
    """Why L-BFGS stops after this iteration (None: it goes on)."""


@dataclass
class _State:
    """Everything that survives a coordinator restart (JSON-able)."""

    iteration: int = 0
    evaluation: int = 0
    num_evaluations: int = 0
    names_made: int = 0
    loss: float = 0.0
    prev_loss: float = 0.0
    grad: str = ""
    prev_grad: str = ""
    grad_max_abs: float = 0.0
    grad_abs_sum: float = 0.0
    t: float = 0.0
    h_diag: float = 1.0
    history: list[list[Any]] = field(default_factory=list)
    """[s name, y name, rho = 1 / (y . s)], oldest first."""
    gram: dict[str, float] = field(default_factory=dict)
    """Dot products among the history vectors and the gradient, by ``"a|b"`` (a <= b)."""
    dead: list[str] = field(default_factory=list)
    """Vectors made here that are no longer needed, dropped with the next program."""
    stop_reason: str | None = None


def _key(a: str, b: str) -> str:
    return f"{a}|{b}" if a <= b else f"{b}|{a}"


def _norm(squared_norm: float) -> float:
    """The L2 norm of a vector from its dot with itself: NaN stays NaN (a diverged gradient),
    where ``max(0.0, nan)`` would report 0.0 as if the gradient had vanished."""
    return math.nan if math.isnan(squared_norm) else max(0.0, squared_norm) ** 0.5


class SandblasterLBFGS:
    """L-BFGS over a VectorSpace; ``start`` then ``step`` until ``stop_reason`` is set.

    Args:
        space: Runs programs on the shards.
        evaluate: Has the workers evaluate the objective's sums at a point.
        settings: The algorithm's knobs.
    """

    def __init__(self, space: VectorSpace, evaluate: Evaluate, settings: LBFGSSettings) -> None:
        self.space = space
        self._evaluate = evaluate
        self.settings = settings
        self.state = _State()
        self._programs = 0

    @property
    def stop_reason(self) -> str | None:
        """Why L-BFGS stopped (e.g. "gradient below tolerance_grad"); None while it goes on."""
        return self.state.stop_reason

    @property
    def started(self) -> bool:
        """Whether ``start`` has evaluated the objective at the start point."""
        return bool(self.state.grad)

    def state_dict(self) -> dict[str, Any]:
        """The coordinator's state at the end of the last iteration (JSON-able)."""
        return {
            "settings": {
                "history_size": self.settings.history_size,
                "line_search": self.settings.line_search,
            },
            **self.state.__dict__,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output (the shards restored the same moment).

        Raises:
            ValueError: it was saved with another history size or line search.
        """
        settings = saved.get("settings", {})
        mine = {
            "history_size": self.settings.history_size,
            "line_search": self.settings.line_search,
        }
        if settings != mine:
            raise ValueError(f"saved with {settings}, resumed with {mine}")
        self.state = _State(**{k: v for k, v in saved.items() if k != "settings"})
        # The bounds are the resumed run's: it may go on past the saved ones, or stop at once.
        if self.state.stop_reason in RESUMABLE_STOPS:
            self.state.stop_reason = self._bound_reached()

    def _bound_reached(self) -> str | None:
        """ITERATIONS_DONE or BUDGET_SPENT, checked in torch's order (``n_iter == max_iter``
        before ``current_evals >= max_eval``); None when neither is reached."""
        iterations, budget = self.settings.max_iterations, self.settings.max_evaluations
        if iterations is not None and self.state.iteration >= iterations:
            return ITERATIONS_DONE
        if budget is not None and self.state.num_evaluations >= budget:
            return BUDGET_SPENT
        return None

    def _run(self, program: Program) -> list[Any]:
        self._programs += 1
        return self.space.run(program)

    def _new_name(self, prefix: str) -> str:
        self.state.names_made += 1
        return f"{prefix}{self.state.names_made}"

    def _evaluate_into(self, program: Program, point: str) -> tuple[float, str, float]:
        """Runs ``program`` (which builds ``point``), evaluates there into a new gradient
        vector and scales it to the batch mean; returns (loss, gradient name, 1/N)."""
        state = self.state
        state.evaluation += 1
        grad = self._new_name("g")
        program.open_evaluation(state.evaluation, grad)
        self._run(program)
        outcome = self._evaluate(state.evaluation, point)
        state.num_evaluations += 1
        if outcome.num_examples < 1:
            raise ValueError(f"evaluation {state.evaluation} covered no examples")
        return outcome.loss_sum / outcome.num_examples, grad, 1.0 / outcome.num_examples

    def start(self) -> IterationRecord:
        """Evaluates the objective at the shards' parameters (iteration 0)."""
        self._programs = 0
        loss, grad, inverse_count = self._evaluate_into(Program(), PARAM)
        finish = Program()
        finish.close_evaluation(self.state.evaluation)
        finish.scale(grad, inverse_count)
        max_abs, abs_sum, norm2 = finish.max_abs(grad), finish.abs_sum(grad), finish.dot(grad, grad)
        results = self._run(finish)
        state = self.state
        state.loss, state.grad = loss, grad
        state.grad_max_abs, state.grad_abs_sum = results[max_abs], results[abs_sum]
        state.gram = {_key(grad, grad): results[norm2]}
        if self._diverged():
            state.stop_reason = NOT_FINITE
        elif state.grad_max_abs <= self.settings.tolerance_grad:
            state.stop_reason = "gradient below tolerance_grad"
        return self._record(0.0, 1)

    def _diverged(self) -> bool:
        """Whether the current point's loss or gradient is NaN or infinite: no direction or
        step can be computed from it (torch's LBFGS goes on with NaN parameters to its bound;
        the shards take no NaN coefficient)."""
        return not (math.isfinite(self.state.loss) and math.isfinite(self.state.grad_max_abs))

    def _record(self, step_size: float, num_evaluations: int) -> IterationRecord:
        state = self.state
        return IterationRecord(
            iteration=state.iteration,
            loss=state.loss,
            grad_norm=_norm(state.gram.get(_key(state.grad, state.grad), 0.0)),
            grad_max_abs=state.grad_max_abs,
            step_size=step_size,
            num_evaluations=num_evaluations,
            num_programs=self._programs,
            stop_reason=state.stop_reason,
        )

    def step(self) -> IterationRecord:
        """One L-BFGS iteration: direction, step (line search or fixed), new gradient."""
        state = self.state
        if state.stop_reason is not None:
            raise RuntimeError(f"L-BFGS has stopped: {state.stop_reason}")
        self._programs = 0
        state.iteration += 1
        slope, direction_max_abs = self._direction()
        state.prev_loss = state.loss
        if state.iteration == 1:
            state.t = min(1.0, 1.0 / state.grad_abs_sum) * self.settings.lr
        else:
            state.t = self.settings.lr
        if slope > -self.settings.tolerance_change:
            state.stop_reason = "directional derivative below tolerance_change"
            return self._record(0.0, 0)
        if self.settings.line_search == "strong-wolfe":
            num_evaluations = self._line_search_step(slope, direction_max_abs)
        else:
            num_evaluations = self._fixed_step()
        self._check_progress(direction_max_abs)
        return self._record(state.t, num_evaluations)

    def _check_progress(self, direction_max_abs: float) -> None:
        """Sets ``stop_reason`` after an iteration, checking torch's conditions in its order."""
        state, settings = self.state, self.settings
        if self._diverged():
            # Before the bounds: a run that diverged on its last iteration stopped for good,
            # which a resume with a bound raised must not take for a bound reached.
            state.stop_reason = NOT_FINITE
            return
        state.stop_reason = self._bound_reached()
        if state.stop_reason is not None:
            return
        if state.grad_max_abs <= settings.tolerance_grad:
            state.stop_reason = "gradient below tolerance_grad"
        elif abs(state.t) * direction_max_abs <= settings.tolerance_change:
            state.stop_reason = "step below tolerance_change"
        elif abs(state.loss - state.prev_loss) < settings.tolerance_change:
            state.stop_reason = "loss change below tolerance_change"

    def _direction(self) -> tuple[float, float]:
        """Updates the history with the last step and builds the direction ``d``; returns
        (g . d, max |d_i|)."""
        state = self.state
        program = Program()
        if state.iteration == 1:
            terms: list[tuple[float, str]] = [(-1.0, state.grad)]
        else:
            terms = self._update_history()
        program.combine(DIRECTION, terms)
        slope, max_abs = program.dot(state.grad, DIRECTION), program.max_abs(DIRECTION)
        self._drop_dead(program)
        results = self._run(program)
        return results[slope], results[max_abs]

    def _update_history(self) -> list[tuple[float, str]]:
        """Adds (s, y) of the last step if its curvature is positive, and returns the
        direction's terms from the two-loop recursion on the Gram matrix."""
        state = self.state
        s, y = self._new_name("s"), self._new_name("y")
        program = Program()
        program.add(y, state.grad, -1.0, state.prev_grad)
        program.combine(s, [(state.t, DIRECTION)])
        wanted: dict[str, int] = {}
        history = [name for pair in state.history for name in pair[:2]]
        pairs = [(state.grad, other) for other in history]
        pairs += [(new, other) for new in (s, y) for other in [*history, state.grad, s, y]]
        for a, b in pairs:
            if _key(a, b) not in wanted:
                wanted[_key(a, b)] = program.dot(a, b)
        results = self._run(program)
        dots = {key: results[index] for key, index in wanted.items()}
        ys, yy = dots[_key(y, s)], dots[_key(y, y)]
        # y is built: the previous gradient is not needed any more.
        state.dead.append(state.prev_grad)
        state.prev_grad = ""
        if ys > CURVATURE_EPS:
            if len(state.history) == self.settings.history_size:
                state.dead.extend(state.history.pop(0)[:2])
            state.history.append([s, y, 1.0 / ys])
            state.h_diag = ys / yy
        else:
            state.dead.extend((s, y))
        state.gram.update(dots)
        live = self._live_names()
        state.gram = {k: v for k, v in state.gram.items() if set(k.split("|")) <= live}
        return self._two_loop()

    def _two_loop(self) -> list[tuple[float, str]]:
        """The direction -H g as coefficients of the base vectors (vector-free two-loop)."""
        state = self.state
        num_old = len(state.history)
        base = [pair[0] for pair in state.history] + [pair[1] for pair in state.history]
        base.append(state.grad)
        coef = [0.0] * len(base)
        coef[-1] = -1.0

        def dot_with(name: str) -> float:
            return sum(
                c * state.gram[_key(name, b)] for c, b in zip(coef, base, strict=True) if c != 0.0
            )

        alphas = [0.0] * num_old
        for i in range(num_old - 1, -1, -1):
            s, y, rho = state.history[i]
            alphas[i] = dot_with(s) * rho
            coef[num_old + i] -= alphas[i]
        coef = [c * state.h_diag for c in coef]
        for i in range(num_old):
            s, y, rho = state.history[i]
            beta = dot_with(y) * rho
            coef[i] += alphas[i] - beta
        return [(c, b) for c, b in zip(coef, base, strict=True) if c != 0.0]

    def _live_names(self) -> set[str]:
        state = self.state
        names = {state.grad, state.prev_grad} - {""}
        names.update(name for pair in state.history for name in pair[:2])
        return names

    def _drop_dead(self, program: Program) -> None:
        """Adds drops of the vectors this coordinator made that nothing refers to any more."""
        live = self._live_names()
        for name in dict.fromkeys(self.state.dead):
            if name not in live:
                program.drop(name)
        self.state.dead = []

    def _line_search_step(self, slope: float, direction_max_abs: float) -> int:
        state = self.state
        made: list[str] = []

        def probe(t: float) -> tuple[float, float, str]:
            program = Program()
            program.add(TRIAL, PARAM, t, DIRECTION)
            loss, grad, inverse_count = self._evaluate_into(program, TRIAL)
            made.append(grad)
            finish = Program()
            finish.close_evaluation(state.evaluation)
            finish.scale(grad, inverse_count)
            index = finish.dot(grad, DIRECTION)
            trial_slope = self._run(finish)[index]
            if not (math.isfinite(loss) and math.isfinite(trial_slope)):
                # The next trial, interpolated from it, would be NaN: a coefficient the shards
                # refuse. The run stops here (NOT_FINITE).
                raise DivergedTrial(LineSearchResult(t, loss, grad, len(made)))
            return loss, trial_slope, grad

        try:
            result = strong_wolfe(
                probe,
                state.t,
                state.loss,
                state.grad,
                slope,
                direction_max_abs,
                tolerance_change=self.settings.tolerance_change,
                max_evaluations=self._line_search_budget(),
            )
        except DivergedTrial as diverged:
            result = diverged.result
        state.t = result.t
        self._accept(result.loss, result.grad, made)
        return result.num_evaluations

    def _line_search_budget(self) -> int:
        """Evaluations the next line search may make: what is left of the budget (torch passes
        ``max_eval - current_evals`` as ``max_ls``)."""
        budget = self.settings.max_evaluations
        if budget is None:
            return LINE_SEARCH_EVALUATIONS
        return budget - self.state.num_evaluations

    def _fixed_step(self) -> int:
        state = self.state
        program = Program()
        program.axpy(PARAM, state.t, DIRECTION)
        loss, grad, inverse_count = self._evaluate_into(program, PARAM)
        finish = Program()
        finish.close_evaluation(state.evaluation)
        finish.scale(grad, inverse_count)
        self._run(finish)
        self._accept(loss, grad, [grad], moved=True)
        return 1

    def _accept(self, loss: float, grad: str, made: list[str], moved: bool = False) -> None:
        """The step is taken: ``param += t d`` (unless done already), the new point's loss
        and gradient become current, the old gradient becomes the previous one."""
        state = self.state
        program = Program()
        if not moved:
            program.axpy(PARAM, state.t, DIRECTION)
        max_abs, norm2 = program.max_abs(grad), program.dot(grad, grad)
        state.prev_grad, state.grad, state.loss = state.grad, grad, loss
        state.dead.extend(made)
        self._drop_dead(program)
        results = self._run(program)
        state.grad_max_abs = results[max_abs]
        state.gram[_key(grad, grad)] = results[norm2]
