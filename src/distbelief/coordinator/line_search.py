"""The strong-Wolfe line search of L-BFGS on scalars: the coordinator's side of it.

The same search as ``torch.optim.lbfgs._strong_wolfe`` (Nocedal and Wright, algorithms 3.5 and
3.6, via minFunc), step for step, except that a gradient never leaves the shards: evaluating a
step ``t`` returns the loss, the directional derivative ``g(t) . d`` and the name of the shard
vector that holds ``g(t)``. The search returns the name of the chosen point's gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Probe = Callable[[float], tuple[float, float, str]]
"""Evaluates the objective at step ``t``: (loss, gradient . direction, gradient's vector)."""


def cubic_minimum(
    x1: float,
    f1: float,
    g1: float,
    x2: float,
    f2: float,
    g2: float,
    bounds: tuple[float, float] | None = None,
) -> float:
    """The minimiser of the cubic through two points with values and slopes, kept in
    ``bounds`` (default: between the points); their midpoint when the cubic has none (also
    for points at one step: a step size so small that the steps round to the same float)."""
    if bounds is not None:
        low, high = bounds
    else:
        low, high = (x1, x2) if x1 <= x2 else (x2, x1)
    midpoint = (low + high) / 2.0
    try:
        d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
        d2_square = d1**2 - g1 * g2
        if not d2_square >= 0:  # negative: no minimum; NaN: steps too close to tell
            return midpoint
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            position = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            position = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    except (ZeroDivisionError, OverflowError):  # steps so close that their difference is 0
        return midpoint
    if not math.isfinite(position):
        return midpoint
    return min(max(position, low), high)


@dataclass
class _Point:
    t: float
    loss: float
    slope: float
    grad: str


@dataclass(frozen=True, slots=True)
class LineSearchResult:
    t: float
    loss: float
    grad: str
    """The vector holding the gradient at the chosen step."""
    num_evaluations: int


class DivergedTrial(Exception):
    """What a probe raises for a trial whose loss or slope is not finite: no step can be
    interpolated from it, so the search ends there, with ``result`` (that trial)."""

    def __init__(self, result: LineSearchResult) -> None:
        super().__init__(result)
        self.result = result


def strong_wolfe(
    probe: Probe,
    t: float,
    loss: float,
    grad: str,
    slope: float,
    direction_max_abs: float,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_evaluations: int = 25,
) -> LineSearchResult:
    """A step along the direction that satisfies the strong Wolfe conditions (or the best
    found within ``max_evaluations``), starting with step ``t`` from the point with ``loss``,
    gradient vector ``grad`` and directional derivative ``slope``."""
    new = _Point(t, *probe(t))
    evaluations = 1
    previous = _Point(0.0, loss, slope, grad)
    bracket: list[_Point] | None = None
    done = False
    ls_iter = 0
    while ls_iter < max_evaluations:
        if new.loss > loss + c1 * new.t * slope or (ls_iter > 1 and new.loss >= previous.loss):
            bracket = [previous, new]
            break
        if abs(new.slope) <= -c2 * slope:
            bracket = [new]
            done = True
            break
        if new.slope >= 0:
            bracket = [previous, new]
            break
        step = cubic_minimum(
            previous.t,
            previous.loss,
            previous.slope,
            new.t,
            new.loss,
            new.slope,
            bounds=(new.t + 0.01 * (new.t - previous.t), new.t * 10),
        )
        previous = new
        new = _Point(step, *probe(step))
        evaluations += 1
        ls_iter += 1
    if ls_iter == max_evaluations:
        bracket = [_Point(0.0, loss, slope, grad), new]
    assert bracket is not None
    low, evaluations = _zoom(
        probe,
        bracket,
        done,
        ls_iter,
        loss,
        slope,
        direction_max_abs,
        evaluations,
        c1=c1,
        c2=c2,
        tolerance_change=tolerance_change,
        max_evaluations=max_evaluations,
    )
    return LineSearchResult(low.t, low.loss, low.grad, evaluations)


def _zoom(
    probe: Probe,
    bracket: list[_Point],
    done: bool,
    ls_iter: int,
    loss: float,
    slope: float,
    direction_max_abs: float,
    evaluations: int,
    *,
    c1: float,
    c2: float,
    tolerance_change: float,
    max_evaluations: int,
) -> tuple[_Point, int]:
    """Shrinks the bracket until a point satisfies the conditions; returns its low point."""
    low_pos, high_pos = (0, 1) if bracket[0].loss <= bracket[-1].loss else (1, 0)
    insufficient_progress = False
    while not done and ls_iter < max_evaluations:
        if abs(bracket[1].t - bracket[0].t) * direction_max_abs < tolerance_change:
            break
        t = cubic_minimum(
            bracket[0].t,
            bracket[0].loss,
            bracket[0].slope,
            bracket[1].t,
            bracket[1].loss,
            bracket[1].slope,
        )
        t, insufficient_progress = _away_from_ends(t, bracket, insufficient_progress)
        new = _Point(t, *probe(t))
        evaluations += 1
        ls_iter += 1
        if new.loss > loss + c1 * t * slope or new.loss >= bracket[low_pos].loss:
            bracket[high_pos] = new
            low_pos, high_pos = (0, 1) if bracket[0].loss <= bracket[1].loss else (1, 0)
        else:
            if abs(new.slope) <= -c2 * slope:
                done = True
            elif new.slope * (bracket[high_pos].t - bracket[low_pos].t) >= 0:
                bracket[high_pos] = bracket[low_pos]
            bracket[low_pos] = new
    # A single-point bracket (the first step met the conditions) has only position 0.
    return bracket[low_pos if len(bracket) > 1 else 0], evaluations


def _away_from_ends(t: float, bracket: list[_Point], insufficient: bool) -> tuple[float, bool]:
    """Moves a trial step that sits too close to an end of the bracket 10% inside it, when the
    last step made too little progress too (torch's rule)."""
    high, low = max(bracket[0].t, bracket[1].t), min(bracket[0].t, bracket[1].t)
    eps = 0.1 * (high - low)
    if min(high - t, t - low) >= eps:
        return t, False
    if insufficient or t >= high or t <= low:
        return (high - eps if abs(t - high) < abs(t - low) else low + eps), False
    return t, True
