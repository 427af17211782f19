"""ShardVectors: the vectors the shards hold, as a Sandblaster coordinator and worker use them.

Each call is one VECTORS, ACCUMULATE or READ request per shard, all shards at once through the
ParameterServerClient's lanes and retries; a program's per-shard partial results are combined
with ``combine_partials``. It holds no vector itself.
"""

from __future__ import annotations

import itertools
import math
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import torch

from distbelief.client.ps_client import ParameterServerClient
from distbelief.errors import ProtocolError, ShardRestartedError
from distbelief.wire import Message, ops
from distbelief.wire.vector_program import (
    Instruction,
    Program,
    check_bundle_id,
    check_checkpoint_tag,
    check_vector_name,
    combine_partials,
)


def _check_finite(instructions: Sequence[Instruction]) -> None:
    """Refuse NaN and infinities, which JSON cannot carry (they would arrive as null)."""

    def finite(value: Any) -> bool:
        if isinstance(value, float):
            return math.isfinite(value)
        if isinstance(value, (list, tuple)):
            return all(finite(item) for item in value)
        if isinstance(value, dict):
            return all(finite(item) for item in value.values())
        return True

    for index, instruction in enumerate(instructions):
        if not finite(instruction):
            raise ValueError(
                f"instruction {index} {str(instruction)[:80]} holds a NaN or infinity, which a "
                "program cannot carry"
            )


class ShardVectors:
    """Runs vector programs on every shard, pushes gradient bundles and reads named vectors.

    Programs are numbered per ShardVectors (one life), so a program retried after a lost reply
    runs once on each shard; this object runs one program at a time.

    Args:
        client: Connections to every shard (its handshake done); its ``timeout_s`` and
            ``retry_timeout_s`` bound every call here.
    """

    def __init__(self, client: ParameterServerClient) -> None:
        self.client = client
        self._session = secrets.token_hex(8)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._lives: list | None = None
        """Each shard's process life, as its last answer named it."""
        self._restarted: str | None = None
        """Why programs are refused until a restore (a shard was restarted)."""

    def run(
        self,
        program: Program | Sequence[Instruction],
        checkpoint: str | None = None,
        *,
        restore: str | None = None,
    ) -> list:
        """Run ``program`` on every shard; returns its results for the whole vectors.

        Args:
            program: A Program (or its instructions).
            checkpoint: A tag (a plain folder name): after the program ran, every shard saves
                its checkpoint into ``<its checkpoint dir>/TAG/`` before it answers.
            restore: A tag: before the program runs, every shard becomes the shard it saved
                in ``<its checkpoint dir>/TAG/`` (a restarted coordinator's way back).

        Raises:
            ValueError: the program holds a NaN or infinity, or the tag is not a folder name.
            RemoteError: a shard refused the program (a malformed instruction, a missing
                vector, no checkpoint folder); the instructions before the bad one have run.
            ProtocolError: a shard's answer holds no (or the wrong number of) results.
            ShardUnavailableError / ShardTimeoutError: a shard did not answer in time.
            ShardRestartedError: a shard was restarted since the last program (its vectors
                went back to its last checkpoint); raised again until a ``restore``.
        """
        instructions = (
            program.to_json() if isinstance(program, Program) else [list(i) for i in program]
        )
        _check_finite(instructions)
        meta: dict[str, Any] = {"program": instructions, "session": self._session}
        if checkpoint is not None:
            meta["checkpoint"] = check_checkpoint_tag(checkpoint)
        if restore is not None:
            meta["restore"] = check_checkpoint_tag(restore)
        with self._lock:
            meta["seq"] = next(self._seq)
            # One message per shard (a transport numbers the message it sends), each naming
            # the shard's life as last seen, so a restarted shard refuses before running it.
            messages = [
                Message(ops.VECTORS, {**meta, **self._expected_life(shard_id, restore)})
                for shard_id in range(self.client.num_shards)
            ]
            try:
                replies = self.client.request_each(messages)
            except ShardRestartedError as e:
                self._restarted = str(e)
                raise
            if restore is not None:
                self._restarted = None
            self._lives = [reply.meta.get("life") for reply in replies]
        per_shard = []
        for shard_id, reply in enumerate(replies):
            results = reply.meta.get("results")
            if not isinstance(results, list):
                raise ProtocolError(f"shard {shard_id} answered a program without results")
            per_shard.append(results)
        try:
            return combine_partials(instructions, per_shard)
        except (ValueError, TypeError) as e:
            raise ProtocolError(f"the shards' partial results do not combine: {e}") from e

    @property
    def shard_restarted(self) -> bool:
        """Whether a shard was restarted since the last restore (programs are refused)."""
        return self._restarted is not None

    def _expected_life(self, shard_id: int, restore: str | None) -> dict[str, str]:
        """The ``life`` field of a program for ``shard_id``.

        Raises:
            ShardRestartedError: a shard was restarted and no restore has followed.
        """
        if restore is not None or self._lives is None:
            return {}
        if self._restarted is not None:
            raise ShardRestartedError(self._restarted)
        life = self._lives[shard_id]
        return {} if life is None else {"life": life}

    def push_bundle(
        self, evaluation: int, bundle: str, flat_grads: dict[torch.dtype, torch.Tensor]
    ) -> None:
        """Stage gradient bundle ``bundle`` of ``evaluation`` on every shard (each gets its
        slices of ``flat_grads``, sent without a copy) until the coordinator commits it.
        Safe to retry: staging a bundle again replaces it.

        Raises:
            ValueError: ``evaluation`` or ``bundle`` is malformed.
            TypeError / ValueError: ``flat_grads`` does not fit the model's layout.
            EvaluationNotOpenError: a shard does not have ``evaluation`` open (any more).
            RemoteError: a shard refused the bundle otherwise.
            ShardUnavailableError / ShardTimeoutError: a shard did not answer in time.
        """
        if type(evaluation) is not int or evaluation < 0:
            raise ValueError(f"evaluation must be an integer >= 0, got {evaluation!r}")
        meta = {"evaluation": evaluation, "bundle": check_bundle_id(bundle)}
        client = self.client
        messages = [
            Message(ops.ACCUMULATE, meta, client.slice_views(i, flat_grads, "flat_grads"))
            for i in range(client.num_shards)
        ]
        client.request_each(messages)

    def read(self, vector: str, flat_out: dict[torch.dtype, torch.Tensor]) -> None:
        """Read every shard's slices of ``vector`` straight into ``flat_out`` (as ``pull``
        does for ``param``).

        Raises:
            ValueError: ``vector`` is not a valid name.
            TypeError / ValueError: ``flat_out`` does not fit the model's layout.
            VectorMissingError: a shard has no such vector.
            ProtocolError: a shard sent other slices than it owns.
            ShardUnavailableError / ShardTimeoutError: a shard did not answer in time.
        """
        meta = {"vector": check_vector_name(vector)}
        client = self.client
        targets = [
            dict(client.slice_views(i, flat_out, "flat_out")) for i in range(client.num_shards)
        ]
        sinks = [_sink_into(views) for views in targets]
        messages = [Message(ops.READ, meta) for _ in range(client.num_shards)]
        replies = client.request_each(messages, sinks)
        for shard_id, (reply, views) in enumerate(zip(replies, targets, strict=True)):
            names = [name for name, _ in reply.tensors]
            if names != list(views):
                raise ProtocolError(
                    f"shard {shard_id} sent {names} for {vector!r}, not {list(views)}"
                )


def _sink_into(views: dict[str, torch.Tensor]):
    def sink(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        return views.get(name)

    return sink
