"""Pipeline schedules: the order in which one stage runs the forward (``"F"``) and backward
(``"B"``) passes of a batch's micro-batches.

Each stage follows its own list; the links' blocking receives order the stages among
themselves. Both schedules run the backwards in ascending micro-batch order, which keeps every
stage's sends and its neighbour's receives in the same order (no deadlock).
"""

from __future__ import annotations

from collections.abc import Callable


def _check(num_stages: int, stage: int, num_micro: int) -> None:
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in [0, {num_stages})")
    if num_micro < 1:
        raise ValueError(f"num_micro must be >= 1, got {num_micro}")


def gpipe(num_stages: int, stage: int, num_micro: int) -> list[tuple[str, int]]:
    """GPipe (fill-drain): every micro-batch's forward, then every backward.

    Simple, but a stage holds the activations of all ``num_micro`` micro-batches at once.

    Args:
        num_stages: Number of stages P.
        stage: This stage, in ``[0, P)``.
        num_micro: Micro-batches per batch M.

    Returns:
        ``("F", m)`` and ``("B", m)`` actions in the order this stage runs them.

    Raises:
        ValueError: If an argument is out of range.
    """
    _check(num_stages, stage, num_micro)
    return [("F", m) for m in range(num_micro)] + [("B", m) for m in range(num_micro)]


def one_f_one_b(num_stages: int, stage: int, num_micro: int) -> list[tuple[str, int]]:
    """1F1B (PipeDream-flush): a warm-up of ``min(P - stage - 1, M)`` forwards, then one
    forward and one backward in turn, then the remaining backwards.

    Same bubble as GPipe, but a stage holds at most ``P - stage`` micro-batches' activations.

    Args:
        num_stages: Number of stages P.
        stage: This stage, in ``[0, P)``.
        num_micro: Micro-batches per batch M.

    Returns:
        ``("F", m)`` and ``("B", m)`` actions in the order this stage runs them.

    Raises:
        ValueError: If an argument is out of range.
    """
    _check(num_stages, stage, num_micro)
    num_warmup = min(num_stages - stage - 1, num_micro)
    actions = [("F", m) for m in range(num_warmup)]
    next_backward = 0
    for m in range(num_warmup, num_micro):
        actions += [("F", m), ("B", next_backward)]
        next_backward += 1
    actions += [("B", m) for m in range(next_backward, num_micro)]
    return actions


SCHEDULES: dict[str, Callable[[int, int, int], list[tuple[str, int]]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}
"""Schedule name -> function of (num_stages, stage, num_micro) giving that stage's actions."""
