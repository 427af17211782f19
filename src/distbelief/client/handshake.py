"""The handshake of a ParameterServerClient with its shards: each shard's hello (its model,
layout, partitioner and consistency settings checked against this client's), initialising
empty shards from the model, and the consistency settings they agree on. A mixin of
ParameterServerClient: it pushes and pulls nothing of the training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from distbelief.errors import (
    ConsistencyMismatchError,
    ModelMismatchError,
    ShardEmptyError,
    ShardListError,
    ShardTimeoutError,
)
from distbelief.sharding import specs_to_json
from distbelief.wire import Message, ops
from distbelief.wire.group_names import DEFAULT_GROUP, INITIALIZED_GROUPS_KEY

logger = logging.getLogger(__name__)

INIT_POLL_S = 0.05


def check_shard_count(addresses: Sequence[str], shard_id: int, described: dict) -> None:
    """Raise ShardListError unless the shard at ``addresses[shard_id]``, as its hello reply
    ``described`` it, is one of ``len(addresses)`` shards."""
    if described.get("num_shards") != len(addresses):
        raise ShardListError(
            f"shard {shard_id} ({addresses[shard_id]}) is one of "
            f"{described.get('num_shards')} shards, but "
            f"{len(addresses)} {'was' if len(addresses) == 1 else 'were'} given"
        )


def _shown(key: str, setting: object) -> str:
    """A shard's consistency setting ``key`` in a mismatch: an unset one (no bound) as such,
    sync or not in words."""
    if key == "sync" and isinstance(setting, bool):
        return "sync rounds (--sync)" if setting else "asynchronously (no --sync)"
    return "(not set)" if setting is None else repr(setting)


def _described_field(key: str) -> str:
    """The config field (``section.field``) of a setting a shard describes at the handshake:
    its consistency section's, but for the round size, which is the job's number of workers."""
    return "cluster.num_workers" if key == "num_workers" else f"consistency.{key}"


class ShardHandshake:
    """``handshake`` and its checks, on the attributes ParameterServerClient's constructor and
    its lanes set (``addresses``, ``specs``, ``partitioner``, ``consistency``...)."""

    def handshake(self, initial: dict[torch.dtype, torch.Tensor] | None) -> bool:
        """Check every shard holds this model; initialise the empty ones from ``initial``.

        With ``initial`` None (an evaluator), waits until a worker has initialised every shard.

        Returns:
            True if this call initialised at least one shard.

        Raises:
            TypeError / ValueError: ``initial`` does not fit the layout; nothing is sent.
            ShardEmptyError: a shard is empty while another has applied updates (restarted
                with no checkpoint): filled from ``initial``, it would mix a new model's
                parameters into the trained one's; nothing is sent.
            ModelMismatchError: a shard holds a different model.
            ShardListError: a shard is one of another number of shards, or listed out of order.
            LayoutMismatchError: a shard holds a different partitioner.
            ConsistencyMismatchError: the shards run different consistency settings, or sync
                rounds of another number of workers than ``num_workers``.
            ShardTimeoutError / ShardUnavailableError: a shard did not answer in time.
        """
        if initial is not None:
            self._check_flats(initial, "initial")  # before anything is sent
        # Every shard's settings are compared before any is initialised, so a mismatched
        # cluster is refused untouched.
        replies = self.check_shards()
        self._check_none_lost(replies)
        futures = [self._submit(i, self._join, replies[i], initial) for i in range(self.num_shards)]
        return any(self.wait(futures))

    def check_shards(self) -> list[dict]:
        """The handshake's checks alone, changing nothing on the shards: each holds this
        model (or none yet), in this layout, with the others' consistency settings. Returns
        each shard's description.

        Raises:
            As :meth:`handshake`, but for the errors of ``initial``.
        """
        replies = self.wait([self._submit(i, self._hello) for i in range(self.num_shards)])
        self.pushed_steps = [reply.get(ops.PUSHED_STEP_KEY) for reply in replies]
        self.consistency = self._agreed_consistency(
            [dict(reply.get("consistency", self.consistency)) for reply in replies]
        )
        self._check_round_size(self.consistency)
        for shard_id, reply in enumerate(replies):
            self._check_same_kind_of_model(shard_id, reply)
        return replies

    def _check_none_lost(self, described: list[dict]) -> None:
        """Empty shards are filled only while no shard has applied an update: the job's first
        start, or one whose shards were all emptied (an empty shard's hello in ``described`` is
        replaced by its answer when asked again). An empty shard beside trained ones lost
        its part of the model (a ``distbelief ps`` restarted without ``--checkpoint-dir``); a
        worker filling it would train half a model from new values without a word, and an
        evaluator waiting for one would wait for nothing."""
        empty = [i for i, reply in enumerate(described) if not reply.get("initialized")]
        versions = [int(reply.get("version", 0)) for reply in described]
        trained = [i for i, version in enumerate(versions) if i not in empty and version > 0]
        if empty and trained:
            # The hellos are answered at different moments: another worker may have filled
            # every shard and pushed between the answer of one found empty and that of one
            # found trained (it fills all before its first push). Asked again now, a shard
            # of this job holds its parameters; one restarted empty still holds none.
            again = self.wait([self._submit(i, self._hello) for i in empty])
            for shard_id, reply in zip(empty, again, strict=True):
                self._check_same_kind_of_model(shard_id, reply)
                described[shard_id] = reply  # joined as it is now: filled, not to be filled
            empty = [i for i in empty if not described[i].get("initialized")]
        if not empty or not trained:
            return
        lost = ", ".join(f"shard {i} ({self.addresses[i]})" for i in empty)
        at, version = trained[0], versions[trained[0]]
        raise ShardEmptyError(
            f"{lost} {'holds' if len(empty) == 1 else 'hold'} no parameters while shard {at} "
            f"({self.addresses[at]}) has applied {version} updates: restarted with no "
            "checkpoint to restore from, what it held is lost (distbelief ps --checkpoint-dir "
            "DIR keeps it across restarts); filling it anew would mix new parameters into the "
            "trained model"
        )

    def _agreed_consistency(self, described: list[dict]) -> dict:
        """The consistency settings every shard described, which must all be equal."""
        first = described[0]
        for shard_id, settings in enumerate(described[1:], start=1):
            # Sync first: an async shard runs no rounds, so its round size differs from a
            # sync one's too, and naming that would hide the setting that differs.
            for key in sorted(set(first) | set(settings), key=lambda name: (name != "sync", name)):
                at_first, at_other = first.get(key, "(absent)"), settings.get(key, "(absent)")
                if at_first != at_other:
                    raise ConsistencyMismatchError(
                        f"shard 0 ({self.addresses[0]}) runs {_shown(key, at_first)} but shard "
                        f"{shard_id} ({self.addresses[shard_id]}) runs {_shown(key, at_other)}: "
                        "start "
                        "every shard with the same consistency flags",
                        _described_field(key),
                    )
        return first

    def _check_round_size(self, agreed: dict) -> None:
        """Sync rounds expect the number of workers this worker was started for."""
        expected = agreed.get("num_workers")
        if not agreed.get("sync") or self.num_workers is None or expected == self.num_workers:
            return
        raise ConsistencyMismatchError(
            f"shard 0 ({self.addresses[0]}) runs sync rounds of {expected} workers, but this "
            f"worker is one of {self.num_workers}: start the shards and every worker for the "
            "same number of workers",
            _described_field("num_workers"),
        )

    def _check_same_kind_of_model(self, shard_id: int, described: dict) -> None:
        """A shard holds a whole model or a partitioned one's groups, never both: a client of
        the other kind would wait for an initialisation that never comes (an evaluator), or
        train a model of its own beside the job's (a worker)."""
        if described.get("initialized"):
            return
        held = described.get(INITIALIZED_GROUPS_KEY, [])
        partitions = [name for name in held if name != DEFAULT_GROUP]
        where = f"shard {shard_id} ({self.addresses[shard_id]})"
        if not self.group and partitions:
            raise ModelMismatchError(
                f"{where} holds a partitioned model ({len(partitions)} parameter groups: "
                f"{', '.join(partitions)}), not a whole one: give the job's --partitions"
            )
        if self.group and DEFAULT_GROUP in held:
            raise ModelMismatchError(
                f"{where} holds a whole model, not partition {self.group!r} of one: "
                "this job's replicas are not partitioned (drop --partitions)"
            )

    def _hello_meta(self, shard_id: int) -> dict:
        return {
            "shard_id": shard_id,
            "specs": specs_to_json(self.specs),
            "partitioner": self.partitioner.to_json(),
            **self._identity(0),
        }

    def _hello(self, shard_id: int) -> dict:
        """One HELLO: the shard's description (the shard refuses another model or layout).

        Raises:
            ShardListError: the shard is one of another number of shards.
        """
        reply = self._request(shard_id, Message(ops.HELLO, self._hello_meta(shard_id)))
        self._settle(shard_id, reply.meta)
        check_shard_count(self.addresses, shard_id, reply.meta)
        return reply.meta

    def _join(self, shard_id: int, described: dict, initial) -> bool:
        """Initialise one shard from ``initial`` if it is empty (or, with ``initial`` None,
        wait until a worker has); True if it adopted ``initial``."""
        deadline = time.monotonic() + self.timeout_s
        where = f"shard {shard_id} ({self.addresses[shard_id]})"
        if not described.get("initialized") and initial is None:
            # Said once: the wait is silent else, and as long as the request timeout.
            logger.info(
                "%s holds no parameters yet: waiting up to %gs (the request timeout) for a "
                "worker to initialise it",
                where,
                self.timeout_s,
            )
        while not described.get("initialized"):
            if initial is not None:
                tensors = self.slice_views(shard_id, initial, "initial")
                meta = self._hello_meta(shard_id)
                reply = self._request(shard_id, Message(ops.INIT, meta, tensors))
                return bool(reply.meta.get("adopted"))
            if time.monotonic() > deadline:
                raise ShardTimeoutError(
                    f"{where}: no worker initialised it within {self.timeout_s:g}s (the "
                    "request timeout: --timeout)"
                )
            time.sleep(INIT_POLL_S)
            described = self._hello(shard_id)
        self.versions[shard_id] = int(described.get("version", 0))
        return False
