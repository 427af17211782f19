"""Sandblaster's operations on a ParameterShard's named vectors: running a vector program
(``wire/vector_program.py``) once per request, staging workers' gradient bundles, reading a
vector. A mixin of ParameterShard: it runs under the shard's lock and applies no push.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from distbelief.errors import VectorMissingError
from distbelief.server.shard_state import check_slices
from distbelief.server.store import PARAM
from distbelief.server.vectors import VectorExecutor
from distbelief.wire.vector_program import (
    Instruction,
    check_bundle_id,
    check_vector_name,
    writes_vector,
)

_MAX_PROGRAM_SESSIONS = 64
"""Sessions whose last vector program a shard remembers (to answer a retry)."""


class ShardVectorOps:
    """Vector programs, bundles and vector reads of a ParameterShard, on the attributes its
    constructor sets (the store, the accumulator, ``_last_program``, the versions) under its
    lock ``_changed``."""

    def run_program(
        self, instructions: Sequence[Instruction], *, seq: tuple[str, int] | None = None
    ) -> list:
        """Run a vector program (``wire/vector_program.py``) on this shard's named vectors.

        Args:
            instructions: The program's instructions, run in order.
            seq: (session, number) of the request, as a push's: a program seen before (a
                retry after a lost reply) is answered with its results again, not rerun.

        Returns:
            This shard's partial results, one per reducing instruction.

        Raises:
            ValueError: an instruction is malformed or reads a missing vector (the instructions
                before it have run).
        """
        self.require_initialized()
        with self._changed:
            if seq is not None:
                last = self._last_program.get(seq[0])
                if last is not None and last[0] == seq[1]:
                    return list(last[1])
            assert self.store is not None
            writes_params = writes_vector(instructions, PARAM)
            with self._writing() if writes_params else contextlib.nullcontext():
                try:
                    results = VectorExecutor(self.store, self.accumulator).run(instructions)
                finally:
                    # A program may have written the parameters: no pull may skip its copy.
                    self._generation += 1
                if writes_params:
                    # A step of the parameters is an update (readers such as the evaluator see
                    # a new version; each Sandblaster iteration is one).
                    self._version += 1
            if seq is not None:
                self._last_program.pop(seq[0], None)
                if len(self._last_program) >= _MAX_PROGRAM_SESSIONS:
                    del self._last_program[next(iter(self._last_program))]
                self._last_program[seq[0]] = (seq[1], results)
            return list(results)

    def stage_bundle(self, evaluation: int, bundle: str, grads: Sequence[torch.Tensor]) -> None:
        """Stage a worker's gradient bundle (one tensor per slice, kept, not copied) for the
        open evaluation, until a program commits it; staging it again replaces it.

        Raises:
            EvaluationNotOpenError: ``evaluation`` is not open on this shard.
            ValueError: ``grads`` do not fit the slices, or too many bundles are waiting.
        """
        self.require_initialized()
        check_slices(self.slices, grads, "bundle")
        with self._changed:
            self.accumulator.stage(evaluation, check_bundle_id(bundle), grads)

    def read_vector_into(self, name: str, outs: Sequence[torch.Tensor]) -> None:
        """Copy this shard's slices of vector ``name`` into ``outs`` (``param``: as a pull).

        Raises:
            VectorMissingError: there is no vector ``name``.
            ValueError: ``outs`` do not fit the slices.
        """
        self.require_initialized()
        check_slices(self.slices, outs, "read")
        with self._changed:
            assert self.store is not None
            vector = self.store.find(check_vector_name(name))
            if vector is None:
                raise VectorMissingError(f"shard {self.shard_id} has no vector {name!r}")
            torch._foreach_copy_(list(outs), vector)
