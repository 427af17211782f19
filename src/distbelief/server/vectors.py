"""Runs vector programs (``wire/vector_program.py``) on one shard's store, and stages the
gradient bundles workers push during a Sandblaster evaluation until the coordinator commits them.

Every vector is the shard's slice of a named vector: one tensor per parameter slice, kept in the
ShardStore (so checkpoints save them). Reductions return this shard's partial result; the
caller combines the shards'. No locking here: the shard runs a program under its lock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson
import torch

from distbelief.errors import EvaluationNotOpenError
from distbelief.server.store import PARAM, ShardStore
from distbelief.wire.vector_program import (
    ARITY,
    NAME_MAX_CHARS,
    Instruction,
    check_bundle_id,
    check_vector_name,
)

MAX_STAGED_BUNDLES = 256
"""Bundles one evaluation may hold uncommitted on a shard (each is a copy of the slices)."""

VALUE_MAX_DEPTH = 32
"""Deepest nesting of lists and objects a kept value may have: a reply nests it further, and
the wire's JSON encoder refuses to write more than 254 levels."""
VALUE_MAX_BYTES = 64 * 1024
"""Longest JSON a kept value may encode to."""
RESULTS_MAX_BYTES = 1024 * 1024
"""Most JSON bytes of kept values one program may read back (its reply must fit the wire's
4 MiB metadata, and a program of many ``get_value`` instructions must not build a huge one)."""


class EvaluationAccumulator:
    """The gradient pushes of the open evaluation: staged per bundle, added to the evaluation's
    vector only when the coordinator commits the bundle, so a bundle that a dead worker pushed
    to some shards only, or a backup's duplicate, never reaches the sum."""

    def __init__(self) -> None:
        self.evaluation: int | None = None
        self.target: str | None = None
        self.staged: dict[str, list[torch.Tensor]] = {}
        self.committed: set[str] = set()

    def open(self, evaluation: int, target: str) -> None:
        """Accept pushes for ``evaluation``, summed into vector ``target`` (which the caller
        has zeroed); an evaluation still open is dropped with what it staged."""
        self.evaluation, self.target = evaluation, target
        self.staged, self.committed = {}, set()

    def _require_open(self, evaluation: int, what: str) -> None:
        if evaluation != self.evaluation:
            raise ValueError(
                f"{what} is for evaluation {evaluation}, but the open evaluation is "
                f"{self.evaluation}"
            )

    def stage(self, evaluation: int, bundle: str, grads: Sequence[torch.Tensor]) -> None:
        """Keep ``grads`` (used, not copied) as bundle ``bundle``; a repeat replaces it, and a
        repeat of a bundle already committed changes nothing.

        Raises:
            EvaluationNotOpenError: ``evaluation`` is not the open one.
            ValueError: too many bundles are waiting.
        """
        if evaluation != self.evaluation:
            raise EvaluationNotOpenError(
                f"bundle {bundle!r} is for evaluation {evaluation}, which is not open on this "
                f"shard (open: {self.evaluation})"
            )
        if bundle in self.committed:
            return  # a retried push of a bundle already counted: counted once
        if bundle not in self.staged and len(self.staged) >= MAX_STAGED_BUNDLES:
            raise ValueError(f"{MAX_STAGED_BUNDLES} bundles are waiting to be committed")
        self.staged[bundle] = list(grads)

    def commit(self, evaluation: int, bundle: str, store: ShardStore) -> None:
        """Add bundle ``bundle`` to the evaluation's vector (once; a repeat is a no-op).

        Raises:
            ValueError: ``evaluation`` is not open, or the bundle was not pushed here.
        """
        self._require_open(evaluation, f"commit of {bundle!r}")
        if bundle in self.committed:
            return
        grads = self.staged.pop(bundle, None)
        if grads is None:
            raise ValueError(f"bundle {bundle!r} of evaluation {evaluation} was not pushed here")
        assert self.target is not None
        torch._foreach_add_(store.get(self.target), grads)
        self.committed.add(bundle)

    def close(self, evaluation: int) -> None:
        """Stop accepting pushes for ``evaluation`` and drop its uncommitted bundles.

        Raises:
            ValueError: ``evaluation`` is not open.
        """
        self._require_open(evaluation, "close")
        self.evaluation, self.target = None, None
        self.staged = {}


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _value_key(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= NAME_MAX_CHARS:
        raise ValueError(f"a value key is a string of 1-{NAME_MAX_CHARS} chars, got {value!r}")
    return value


def _nesting(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (0: a plain value); iterative, as a
    peer's JSON may nest deeper than Python's recursion allows."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth + 1)
            if deepest > VALUE_MAX_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _encoded_size(value: Any) -> int:
    return len(orjson.dumps(value))


def _kept_value(value: Any) -> Any:
    """``value`` if a shard can keep it and send it back in a reply, else a ValueError."""
    if _nesting(value) > VALUE_MAX_DEPTH:
        raise ValueError(f"a value nests lists and objects at most {VALUE_MAX_DEPTH} deep")
    if _encoded_size(value) > VALUE_MAX_BYTES:
        raise ValueError(f"a value is at most {VALUE_MAX_BYTES} bytes of JSON")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return value


_DOT_CHUNK = 1 << 20
"""Elements per float64 copy a dot product makes (8 MiB each)."""


def _dot64(x: torch.Tensor, y: torch.Tensor) -> float:
    """``x . y`` summed in float64, over float64 copies. A float32 ``torch.dot`` rounds in an
    order that depends on where the tensors start in memory (its vector loop aligns first), so
    a vector restored from a checkpoint would give other dot products than the same vector
    before: a restarted coordinator would leave the sequence it was on."""
    total = []
    for start in range(0, x.numel(), _DOT_CHUNK):
        pieces = [t[start : start + _DOT_CHUNK].to(torch.float64, copy=True) for t in (x, y)]
        total.append(float(torch.dot(*pieces)))
    return math.fsum(total)


class VectorExecutor:
    """Runs programs against one shard's store and evaluation accumulator."""

    def __init__(self, store: ShardStore, accumulator: EvaluationAccumulator) -> None:
        self.store = store
        self.accumulator = accumulator
        self._values_read_bytes = 0
        """JSON bytes of the values the running program has read back so far."""

    def run(self, instructions: Sequence[Instruction]) -> list[Any]:
        """Runs ``instructions`` in order; returns this shard's partial results.

        Raises:
            ValueError: an instruction is unknown or malformed, or reads a vector that does
                not exist, or the values it reads back exceed ``RESULTS_MAX_BYTES``
                (instructions before it have run).
        """
        if not isinstance(instructions, list):
            raise ValueError(f"a program is a list of instructions, got {type(instructions)}")
        self._values_read_bytes = 0
        results: list[Any] = []
        for index, instruction in enumerate(instructions):
            try:
                self._run_one(instruction, results)
            except (ValueError, TypeError, KeyError, RuntimeError) as e:
                raise ValueError(f"instruction {index} {str(instruction)[:80]}: {e}") from e
        return results

    def _vector(self, name: Any) -> list[torch.Tensor]:
        vector = self.store.find(check_vector_name(name))
        if vector is None:
            raise ValueError(f"no vector {name!r} on this shard")
        return vector

    def _target(self, name: Any) -> list[torch.Tensor]:
        """The vector ``name``, created (zeros shaped like the slices) if missing."""
        vector = self.store.find(check_vector_name(name))
        return vector if vector is not None else self.store.add(name)

    def _run_one(self, instruction: Any, results: list[Any]) -> None:
        if not isinstance(instruction, list) or not instruction:
            raise ValueError("an instruction is a non-empty list")
        op, args = instruction[0], instruction[1:]
        if not isinstance(op, str) or op not in ARITY:
            raise ValueError(f"unknown instruction {op!r}")
        if len(args) != ARITY[op]:
            raise ValueError(f"{op} takes {ARITY[op]} arguments, got {len(args)}")
        getattr(self, f"_{op}")(*args, results=results)

    def _zero(self, dst, *, results) -> None:
        torch._foreach_zero_(self._target(dst))

    def _copy(self, dst, src, *, results) -> None:
        source = self._vector(src)
        torch._foreach_copy_(self._target(dst), source)

    def _scale(self, dst, alpha, *, results) -> None:
        torch._foreach_mul_(self._vector(dst), _number(alpha))

    def _axpy(self, dst, alpha, src, *, results) -> None:
        source = self._vector(src)
        torch._foreach_add_(self._vector(dst), source, alpha=_number(alpha))

    def _add(self, dst, a, alpha, b, *, results) -> None:
        first, second, scale = self._vector(a), self._vector(b), _number(alpha)
        for out, x, y in zip(self._target(dst), first, second, strict=True):
            torch.add(x, y, alpha=scale, out=out)

    def _combine(self, dst, terms, *, results) -> None:
        if not isinstance(terms, list) or not terms:
            raise ValueError("combine needs a non-empty list of [coef, vector] terms")
        pairs = []
        for term in terms:
            if not isinstance(term, list) or len(term) != 2:
                raise ValueError(f"a combine term is [coef, vector], got {term!r}")
            pairs.append((_number(term[0]), self._vector(term[1])))
        # Built apart from dst, which may be one of the sources.
        total = [torch.mul(tensor, pairs[0][0]) for tensor in pairs[0][1]]
        for coef, vector in pairs[1:]:
            torch._foreach_add_(total, vector, alpha=coef)
        torch._foreach_copy_(self._target(dst), total)

    def _drop(self, name, *, results) -> None:
        if name == PARAM:
            raise ValueError("the parameters cannot be dropped")
        if name == self.accumulator.target:
            raise ValueError(f"{name!r} sums the open evaluation {self.accumulator.evaluation}")
        self.store.remove(check_vector_name(name))

    def _dot(self, a, b, *, results) -> None:
        first, second = self._vector(a), self._vector(b)
        results.append(math.fsum(_dot64(x, y) for x, y in zip(first, second, strict=True)))

    def _max_abs(self, a, *, results) -> None:
        maxima = [float(t.abs().max()) for t in self._vector(a) if t.numel()]
        if any(math.isnan(value) for value in maxima):
            results.append(math.nan)  # as torch's max: a NaN anywhere is the answer
        else:
            results.append(max(maxima, default=0.0))

    def _abs_sum(self, a, *, results) -> None:
        results.append(math.fsum(float(t.abs().sum(dtype=torch.float64)) for t in self._vector(a)))

    def _set_value(self, key, value, *, results) -> None:
        self.store.values[_value_key(key)] = _kept_value(value)

    def _get_value(self, key, *, results) -> None:
        value = self.store.values.get(_value_key(key))
        self._values_read_bytes += _encoded_size(value)
        if self._values_read_bytes > RESULTS_MAX_BYTES:
            raise ValueError(f"a program reads back at most {RESULTS_MAX_BYTES} bytes of values")
        results.append(value)

    def _open_evaluation(self, evaluation, dst, *, results) -> None:
        if dst == PARAM:
            raise ValueError("an evaluation cannot sum into the parameters")
        torch._foreach_zero_(self._target(dst))
        self.accumulator.open(_integer(evaluation), dst)

    def _commit(self, evaluation, bundle, *, results) -> None:
        self.accumulator.commit(_integer(evaluation), check_bundle_id(bundle), self.store)

    def _close_evaluation(self, evaluation, *, results) -> None:
        self.accumulator.close(_integer(evaluation))
