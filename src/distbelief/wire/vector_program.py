"""Vector programs: the small commands a coordinator sends every shard, as JSON-able values.

A program is a list of instructions on named vectors (each shard holds its slice of every
vector: its ``param`` buffer and any others a program creates). One program travels as one
request to each shard, which runs it in order under its lock; instructions that reduce (a dot
product, a norm) leave a partial result per shard, and ``combine_partials`` turns the shards'
partials into the whole vector's values. This module is the instruction set both sides agree
on; it runs nothing (``server/vectors.py`` does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

Instruction = list[Any]
"""``[name, *arguments]``: JSON-able."""

ARITY: dict[str, int] = {
    "zero": 1,  # dst := 0
    "copy": 2,  # dst := src
    "scale": 2,  # dst *= alpha
    "axpy": 3,  # dst += alpha * src
    "add": 4,  # dst := a + alpha * b
    "combine": 2,  # dst := sum(coef * src for coef, src in terms)
    "drop": 1,  # forget the vector
    "dot": 2,  # -> a . b
    "max_abs": 1,  # -> max |a_i|
    "abs_sum": 1,  # -> sum |a_i|
    "set_value": 2,  # the shard keeps a JSON value under key (saved in its checkpoints)
    "get_value": 1,  # -> the value kept under key (None if there is none)
    "open_evaluation": 2,  # accumulate the gradient pushes of evaluation N into dst (zeroed)
    "commit": 2,  # add the bundle a worker pushed for evaluation N to its gradient
    "close_evaluation": 1,  # stop accepting pushes for evaluation N; drop what was not committed
}
"""Every instruction and its number of arguments."""

WRITING = frozenset({"zero", "copy", "scale", "axpy", "add", "combine"})
"""Instructions that write the vector named by their first argument."""


def writes_vector(instructions: Sequence[Instruction], name: str) -> bool:
    """Whether any of ``instructions`` writes the vector ``name``."""
    # A peer's instruction may be named by any JSON value: only a string can be in WRITING
    # (a list or object there would raise instead of being refused by name when it runs).
    return any(
        len(item) > 1 and isinstance(item[0], str) and item[0] in WRITING and item[1] == name
        for item in instructions
        if isinstance(item, list)
    )


REDUCTIONS: dict[str, str] = {
    "dot": "sum",
    "abs_sum": "sum",
    "max_abs": "max",
    "get_value": "each",
}
"""How the shards' partial results of each reducing instruction combine: ``sum``, ``max``, or
``each`` (a list of every shard's value, in shard order)."""

NAME_MAX_CHARS = 64
"""Longest vector name a program may use."""

VECTOR_NAME = re.compile(r"[A-Za-z0-9_-]+")
"""What a program's vector and value names are made of: dotted names are the shard's own
buffers (optimizer state, a consistency policy's copies), which no program may touch."""

BUNDLE_MAX_CHARS = 128
"""Longest gradient bundle id (``"<worker id>-<session>-<n>"``)."""

CHECKPOINT_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A checkpoint tag: one plain folder name (``lbfgs-000012``), never a path."""


def check_vector_name(value: object) -> str:
    """``value`` if it is a valid vector (or value) name, else a ValueError naming it."""
    if (
        not isinstance(value, str)
        or len(value) > NAME_MAX_CHARS
        or not VECTOR_NAME.fullmatch(value)
    ):
        raise ValueError(
            f"a vector name is 1-{NAME_MAX_CHARS} letters, digits, '_' or '-', got {value!r}"
        )
    return value


def check_bundle_id(value: object) -> str:
    """``value`` if it is a valid gradient bundle id, else a ValueError naming it."""
    if not isinstance(value, str) or not 0 < len(value) <= BUNDLE_MAX_CHARS:
        raise ValueError(f"a bundle id is a string of 1-{BUNDLE_MAX_CHARS} chars, got {value!r}")
    return value


def check_checkpoint_tag(value: object) -> str:
    """``value`` if it is a valid checkpoint tag (a plain folder name), else a ValueError."""
    if not isinstance(value, str) or not CHECKPOINT_TAG.fullmatch(value):
        raise ValueError(
            "a checkpoint tag is a plain folder name (letters, digits, '_', '-', '.', not "
            f"starting with '.'; at most 64 chars), got {value!r}"
        )
    return value


class Program:
    """A vector program under construction. Each reducing method returns the index of its
    result in the list ``combine_partials`` (or a ``ShardVectors.run``) returns.

    Example::

        program = Program()
        program.add("trial", "param", 0.5, "d")
        slope = program.dot("grad", "d")
        results = vectors.run(program)
        results[slope]
    """

    def __init__(self) -> None:
        self.instructions: list[Instruction] = []
        self.num_results = 0

    def __len__(self) -> int:
        return len(self.instructions)

    def _emit(self, *instruction: Any) -> None:
        self.instructions.append(list(instruction))

    def _reduce(self, *instruction: Any) -> int:
        self._emit(*instruction)
        self.num_results += 1
        return self.num_results - 1

    def zero(self, dst: str) -> None:
        self._emit("zero", dst)

    def copy(self, dst: str, src: str) -> None:
        self._emit("copy", dst, src)

    def scale(self, dst: str, alpha: float) -> None:
        self._emit("scale", dst, float(alpha))

    def axpy(self, dst: str, alpha: float, src: str) -> None:
        """``dst += alpha * src`` (torch's ``dst.add_(src, alpha=alpha)``)."""
        self._emit("axpy", dst, float(alpha), src)

    def add(self, dst: str, a: str, alpha: float, b: str) -> None:
        """``dst := a + alpha * b`` (torch's ``torch.add(a, b, alpha=alpha)``)."""
        self._emit("add", dst, a, float(alpha), b)

    def combine(self, dst: str, terms: Sequence[tuple[float, str]]) -> None:
        """``dst := sum(coef * src)`` over ``terms`` (a source may also be ``dst``)."""
        self._emit("combine", dst, [[float(coef), src] for coef, src in terms])

    def drop(self, name: str) -> None:
        self._emit("drop", name)

    def dot(self, a: str, b: str) -> int:
        return self._reduce("dot", a, b)

    def max_abs(self, a: str) -> int:
        return self._reduce("max_abs", a)

    def abs_sum(self, a: str) -> int:
        return self._reduce("abs_sum", a)

    def set_value(self, key: str, value: Any) -> None:
        self._emit("set_value", key, value)

    def get_value(self, key: str) -> int:
        return self._reduce("get_value", key)

    def open_evaluation(self, evaluation: int, dst: str) -> None:
        self._emit("open_evaluation", int(evaluation), dst)

    def commit(self, evaluation: int, bundle: str) -> None:
        self._emit("commit", int(evaluation), bundle)

    def close_evaluation(self, evaluation: int) -> None:
        self._emit("close_evaluation", int(evaluation))

    def to_json(self) -> list[Instruction]:
        return [list(instruction) for instruction in self.instructions]


def result_kinds(instructions: Sequence[Instruction]) -> list[str]:
    """The reduction of each result the instructions leave, in order."""
    return [REDUCTIONS[item[0]] for item in instructions if item[0] in REDUCTIONS]


def combine_partials(
    instructions: Sequence[Instruction], per_shard: Sequence[Sequence[Any]]
) -> list[Any]:
    """The whole vector's results from every shard's partial results of one program.

    Raises:
        ValueError: a shard returned another number of results than the program leaves.
    """
    kinds = result_kinds(instructions)
    for shard_id, partials in enumerate(per_shard):
        if len(partials) != len(kinds):
            raise ValueError(
                f"shard {shard_id} returned {len(partials)} results, the program leaves "
                f"{len(kinds)}"
            )
    combined: list[Any] = []
    for index, kind in enumerate(kinds):
        values = [partials[index] for partials in per_shard]
        if kind == "sum":
            combined.append(_sum([float(value) for value in values]))
        elif kind == "max":
            combined.append(_max([float(value) for value in values]))
        else:
            combined.append(values)
    return combined


def _sum(values: list[float]) -> float:
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):  # huge finite partials, or inf + -inf: as floats add
        return sum(values)


def _max(values: list[float]) -> float:
    # A NaN anywhere is the answer whatever the shard order (Python's max keeps it only first).
    return math.nan if any(math.isnan(value) for value in values) else max(values)
