"""The pull path of a ParameterServerClient: reading every shard's slices into the caller's
buffers, through shared memory on this host or over the wire (sparse changes or whole slices,
narrowed or not), asked again while a shard holds the pull. A mixin of ParameterServerClient:
it pushes nothing and makes no connection (``client/lanes.py`` does).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable, Sequence

import torch

from distbelief.errors import HeldTooLongError, ModelMismatchError
from distbelief.wire import Message, ops
from distbelief.wire.compression import SINCE_KEY, SPARSE_KEY, apply_changes_into
from distbelief.wire.shared_params import PLACED_KEY


class ShardPulls:
    """``pull`` and ``pull_now``, on the attributes ParameterServerClient's constructor and its
    lanes set (``versions``, ``_shared_memory``, ``_held``, ``_pull_staging``...)."""

    def pull(
        self,
        flat_out: dict[torch.dtype, torch.Tensor],
        *,
        clock: int = 0,
        after_versions: Sequence[int] | None = None,
        ready: Callable[[], object] | None = None,
    ) -> list[cf.Future]:
        """Read every shard's slices straight into ``flat_out``; futures resolve to versions.

        With ``after_versions`` (sync rounds), shard i answers once its version exceeds
        ``after_versions[i]``; under SSP a shard answers once this worker may go on.
        ``ready`` is called before each shard's request: it waits until ``flat_out`` may be
        overwritten (a copy of its last contents to a GPU still running, say).

        Raises:
            TypeError / ValueError: ``flat_out`` is not one 1-D tensor per dtype of the
                layout, of exactly its size, or ``clock`` no integer >= 0, or
                ``after_versions`` not one integer >= 0 per shard; nothing is sent.
        """
        return self._submit_all(
            self._pull_one, self._pull_arguments(flat_out, clock, after_versions, ready), now=False
        )

    def pull_now(
        self,
        flat_out: dict[torch.dtype, torch.Tensor],
        *,
        clock: int = 0,
        after_versions: Sequence[int] | None = None,
        timeout_s: float | None = None,
        ready: Callable[[], object] | None = None,
    ) -> list[int]:
        """:meth:`pull` and wait (``timeout_s`` as in :meth:`wait`): the shards' versions."""
        arguments = self._pull_arguments(flat_out, clock, after_versions, ready)
        return self.wait(self._submit_all(self._pull_one, arguments, now=True), timeout_s)

    def _pull_arguments(self, flat_out, clock: int, after_versions, ready) -> list[tuple]:
        after_versions = self.checked_schedule(clock, "after_versions", after_versions)
        return [
            (
                dict(self.slice_views(i, flat_out, "flat_out")),
                clock,
                None if after_versions is None else after_versions[i],
                ready,
            )
            for i in range(self.num_shards)
        ]

    def _pull_one(self, shard_id: int, targets: dict, clock: int, after_version, ready) -> int:
        if ready is not None:
            ready()
        if after_version is None and self._shared_memory is not None:
            version = self._shared_memory.read(
                shard_id,
                list(targets.values()),
                lambda offer: self._share_offer(shard_id, clock, offer),
            )
            if version is not None:
                self._wire.add_shared(pulled=sum(target.nbytes for target in targets.values()))
                self.versions[shard_id] = version
                return version
        meta = {**self._identity(clock), **self._pull_meta}
        if after_version is not None:
            meta["after_version"] = after_version
        if self._held is not None:
            meta |= self._held.since(shard_id, targets)
        reply, written = self._pull_reply(shard_id, targets, meta)
        if reply.meta.get(SPARSE_KEY) and written:
            # An attempt that failed half-way wrote into the buffers: the changes are not
            # against what they hold now. Once more, for everything.
            reply, written = self._pull_reply(shard_id, targets, meta | {SINCE_KEY: None})
        if reply.meta.get(SPARSE_KEY):
            try:
                apply_changes_into(list(targets.values()), list(targets), reply.tensors)
            except ValueError as e:
                raise ModelMismatchError(f"shard {shard_id}: {e}") from None
        elif [name for name, _ in reply.tensors] != list(targets):
            raise ModelMismatchError(f"shard {shard_id} sent {[n for n, _ in reply.tensors]}")
        elif self._pull_staging is not None:
            self._pull_staging.widen(targets)
        if self._held is not None:
            self._held.pulled(shard_id, targets, reply.meta)
        self.versions[shard_id] = int(reply.meta["version"])
        return self.versions[shard_id]

    def _share_offer(self, shard_id: int, clock: int, buffers: dict | None) -> dict:
        """The shard's SHARE reply to the offer of this client's push ``buffers``: where its
        parameters may be read on this host, and whether it maps the buffers, or why not (a
        restarted shard is first sent what its checkpoint lacks, as a pull's reply is)."""
        meta = self._identity(clock)
        if buffers is not None:
            meta[PLACED_KEY] = buffers
        reply = self._request(shard_id, Message(ops.SHARE, meta))
        self._settle(shard_id, reply.meta)
        return reply.meta

    def _pull_reply(self, shard_id: int, targets: dict, meta: dict) -> tuple[Message, bool]:
        """A pull's reply, asked again while held (SSP, sync rounds) or settling a restarted
        shard; and whether any attempt read into ``targets`` themselves."""
        staging = self._pull_staging
        written = []

        def sink(name, dtype, shape):
            buffer = staging.sink(name, targets) if staging is not None else targets.get(name)
            if buffer is not None and buffer is targets.get(name):
                written.append(name)
            return buffer

        deadline = time.monotonic() + self.hold_timeout_s

        def ask() -> Message:
            # The shard holds it at most until the hold's deadline (a hold_timeout_s shorter
            # than the wait was held for the whole wait), and well inside this request's timeout.
            wait_s = min(self.timeout_s / 2, max(0.0, deadline - time.monotonic()))
            return self._request(
                shard_id, Message(ops.PULL, meta | {"max_wait_s": wait_s}), sink=sink
            )

        reply = ask()
        # Held (SSP, sync rounds): ask again. From a restarted shard that was just sent what
        # its checkpoint lacked: ask again for the parameters with it.
        while reply.meta.get("held") or self._settle(shard_id, reply.meta):
            if reply.meta.get("held") and time.monotonic() >= deadline:
                raise HeldTooLongError(
                    f"shard {shard_id} ({self.addresses[shard_id]}): pull held for "
                    f"{self.hold_timeout_s:g}s waiting for slower workers"
                )
            reply = ask()
        return reply, bool(written)
