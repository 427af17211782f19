"""Sandblaster's ops on a shard: VECTORS (a vector program; before it optionally a restore from
``<checkpoint_dir>/TAG/``, after it a save into such a folder), ACCUMULATE (a worker's gradient
bundle) and READ (one named vector's slices). Checks every field of a request, calls the
ParameterShard, encodes the reply; the math is the shard's (``server/vectors.py``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distbelief.errors import CheckpointError, ProtocolError, ShardRestartedError
from distbelief.server.checkpoint import load_checkpoint, save_checkpoint
from distbelief.server.checkpoint_meta import meta_path
from distbelief.sharding import ShardSlice
from distbelief.wire.framing import Sink
from distbelief.wire.message import Message
from distbelief.wire.vector_program import (
    check_bundle_id,
    check_checkpoint_tag,
    check_vector_name,
)

if TYPE_CHECKING:
    from distbelief.server.service import ShardService
    from distbelief.server.shard import ParameterShard

_VECTORS_FIELDS = frozenset({"program", "checkpoint", "restore", "session", "seq", "life"})
_ACCUMULATE_FIELDS = frozenset({"evaluation", "bundle"})
_READ_FIELDS = frozenset({"vector"})


def _check_fields(meta: dict, allowed: frozenset[str], op: str) -> None:
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise ValueError(
            f"{op} request has unknown field(s) {unknown} (allowed: {sorted(allowed)})"
        )


def _program_sequence(meta: dict) -> tuple[str, int] | None:
    """(session, number) of a VECTORS request, if it carries one (a retry is answered once)."""
    session, number = meta.get("session"), meta.get("seq")
    if session is None and number is None:
        return None
    if not isinstance(session, str) or not 0 < len(session) <= 64:
        raise ValueError(f"session must be a string of 1-64 chars, got {session!r}")
    if type(number) is not int or number < 0:
        raise ValueError(f"seq must be an integer >= 0, got {number!r}")
    return session, number


def _json_result(value: Any) -> Any:
    """A partial result as JSON can carry it: JSON has no NaN or infinity, so those travel as
    the text ``float()`` reads back ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class VectorHandlers:
    """The Sandblaster handlers of a ShardConnection (a base class: it uses the connection's
    ``shard``, ``service``, ``_slice_names`` and ``_slice_bytes``)."""

    shard: ParameterShard
    service: ShardService
    _slice_names: list[str]
    _slice_bytes: int
    _read_tensors: list[tuple[str, torch.Tensor]] | None = None
    """The send buffers of this connection's READs (one reply is sent before the next read)."""

    def _vectors(self, request: Message) -> Message:
        meta = request.meta
        _check_fields(meta, _VECTORS_FIELDS, "VECTORS")
        program = meta.get("program")
        if not isinstance(program, list):
            raise ValueError(f"program must be a list of instructions, got {program!r:.80}")
        seq = _program_sequence(meta)
        tag = meta.get("checkpoint")
        # Checked before the program runs, so a refused checkpoint changes nothing.
        directory = None if tag is None else self._checkpoint_directory(tag)
        expected_life = meta.get("life")
        if expected_life is not None and expected_life != self.shard.life:
            # Checked before anything runs: the program was written for vectors this process
            # no longer holds (it restarted from its last checkpoint).
            raise ShardRestartedError(
                f"shard {self.shard.shard_id} was restarted: its vectors are those of its "
                "last checkpoint"
            )
        if meta.get("restore") is not None:
            self._restore_checkpoint(self._checkpoint_directory(meta["restore"]))
        results = self.shard.run_program(program, seq=seq)
        if directory is not None:
            self._save_checkpoint(directory)
        results = [_json_result(value) for value in results]
        return request.reply({"results": results, "life": self.shard.life})

    def _checkpoint_directory(self, tag: Any) -> Path:
        check_checkpoint_tag(tag)
        if self.service.checkpoint_dir is None:
            raise ValueError(
                f"shard {self.shard.shard_id} has no checkpoint folder (start it with "
                f"--checkpoint-dir): it cannot save checkpoint {tag!r}"
            )
        return self.service.checkpoint_dir / tag

    def _restore_checkpoint(self, directory: Path) -> None:
        """Become the shard saved in ``directory`` (a restarted coordinator goes back to its
        last checkpoint, which the shards passed long ago)."""
        state = load_checkpoint(directory, self.shard.shard_id)
        if state is None:
            raise CheckpointError(f"shard {self.shard.shard_id}: no checkpoint in {directory}")
        try:
            self.shard.restore(state)
        except ValueError as e:
            raise CheckpointError(f"{meta_path(Path(directory), self.shard.shard_id)}: {e}") from e

    def _save_checkpoint(self, directory: Path) -> None:
        """Save the shard into ``directory`` (a program's side effects are in it: the
        coordinator sends nothing else meanwhile)."""
        try:
            save_checkpoint(self.shard.snapshot(), directory)
        except OSError as e:
            raise CheckpointError(
                f"shard {self.shard.shard_id}: checkpoint into {directory} failed: {e}"
            ) from e

    @functools.cached_property
    def _slices_by_name(self) -> dict[str, ShardSlice]:
        return {piece.name: piece for piece in self.shard.slices}

    def _accumulate_sink_for(self, request: Message) -> Sink:
        self.shard.require_initialized()
        return self._bundle_sink

    def _bundle_sink(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        piece = self._slices_by_name.get(name)
        if piece is None:
            owned = ", ".join(self._slices_by_name)
            raise ProtocolError(f"shard {self.shard.shard_id} does not own {name!r} (owns {owned})")
        if piece.dtype != dtype or (piece.numel,) != shape:
            raise ProtocolError(f"tensor {name!r}: expected {piece.dtype} [{piece.numel}]")
        # A fresh tensor: the shard keeps it staged until the bundle is committed.
        return torch.empty(piece.numel, dtype=piece.dtype)

    def _accumulate(self, request: Message) -> Message:
        meta = request.meta
        _check_fields(meta, _ACCUMULATE_FIELDS, "ACCUMULATE")
        evaluation = meta.get("evaluation")
        if type(evaluation) is not int or evaluation < 0:
            raise ValueError(f"evaluation must be an integer >= 0, got {evaluation!r}")
        bundle = check_bundle_id(meta.get("bundle"))
        names = [name for name, _ in request.tensors]
        if names != self._slice_names:
            raise ProtocolError(f"a bundle must carry {self._slice_names}, got {names}")
        self.shard.stage_bundle(evaluation, bundle, [tensor for _, tensor in request.tensors])
        self.service.count_bytes(self._slice_bytes, 0)
        return request.reply({})

    def _read(self, request: Message) -> Message:
        _check_fields(request.meta, _READ_FIELDS, "READ")
        name = check_vector_name(request.meta.get("vector"))
        if self._read_tensors is None:
            self.shard.require_initialized()
            buffers = [torch.empty(p.numel, dtype=p.dtype) for p in self.shard.slices]
            self._read_tensors = list(zip(self._slice_names, buffers, strict=True))
        self.shard.read_vector_into(name, [tensor for _, tensor in self._read_tensors])
        self.service.count_bytes(0, self._slice_bytes)
        return request.reply({"vector": name}, self._read_tensors)
