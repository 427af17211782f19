"""ParameterServerClient: push gradients to and pull parameters from every shard, concurrently.

Requests travel on the shard lanes (``lanes.py``): in issue order per shard, every shard at
once. ``push``/``pull`` return futures; ``push_now``/``pull_now`` wait for the answer and run one
shard's request on the calling thread. Every wait has a timeout.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import secrets
import time
from collections.abc import Sequence

import torch

from distbelief.client.lanes import ShardLanes
from distbelief.errors import (
    ConsistencyMismatchError,
    ModelMismatchError,
    ShardTimeoutError,
)
from distbelief.sharding import (
    FlatPartitioner,
    Partitioner,
    ShardSlice,
    TensorSpec,
    layout_fingerprint,
    specs_to_json,
)
from distbelief.wire import Message, ops
from distbelief.wire.security import WireSecurity

_INIT_POLL_S = 0.05
_SLICE_CACHE_ENTRIES = 8
"""Sets of buffers whose slices are kept (an optimizer uses two: gradients out, params in)."""
logger = logging.getLogger(__name__)


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """``"tcp://a:1,tcp://b:2"`` or a list -> list of addresses; ValueError if empty."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ValueError("no parameter-server address given (e.g. tcp://127.0.0.1:7000)")
    return items


class ParameterServerClient(ShardLanes):
    """A worker's (or evaluator's) connections to all shards of one model.

    Args:
        addresses: One address per shard, in shard-id order.
        specs: The model's parameter layout (every process computes the same one).
        timeout_s: Limit for each request to a shard.
        connect_timeout_s: Limit for opening a TCP connection.
        worker_id: This replica's name at the shards (None: an anonymous reader).
        hold_timeout_s: Longest a pull may be held by the shards (SSP, sync rounds).
        retry_timeout_s: How long a shard may stay unreachable (restarting, say) before its
            requests fail; requests are retried with backoff meanwhile. Pushes carry a
            sequence number, so a retried push is applied once.
        security: Authentication key and TLS settings of the job.
        partitioner: Which slices each shard owns (default: byte-balanced flat); every shard
            must hold an equal one, which the handshake checks.
        group: The parameter group on the shards these parameters are (a model-parallel
            partition's, say: each group has its own layout, version and optimizer state);
            "" is the default group.
        source_host: The address of this machine the connections leave from (default: the
            one the operating system picks).
    """

    def __init__(
        self,
        addresses: Sequence[str],
        specs: Sequence[TensorSpec],
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        worker_id: str | None = None,
        hold_timeout_s: float = 300.0,
        retry_timeout_s: float = 60.0,
        security: WireSecurity | None = None,
        partitioner: Partitioner | None = None,
        group: str = "",
        source_host: str | None = None,
    ) -> None:
        super().__init__(
            addresses,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            retry_timeout_s=retry_timeout_s,
            security=security,
            source_host=source_host,
        )
        self.worker_id = worker_id
        self.group = group
        self._group_meta = {"group": group} if group else {}
        self.hold_timeout_s = hold_timeout_s
        self._push_seq = itertools.count(1)
        # One session per client life: a restarted worker's numbering starts afresh.
        self._session = secrets.token_hex(8)
        self.consistency: dict = {"sync": False, "max_staleness": None}
        """The shards' consistency settings, as every shard described them at the handshake."""
        self._staleness: list[int] = []
        self.specs = list(specs)
        self.fingerprint = layout_fingerprint(self.specs)
        self.partitioner: Partitioner = partitioner or FlatPartitioner()
        self.slices: list[list[ShardSlice]] = self.partitioner.partition(
            self.specs, len(self.addresses)
        )
        self._slice_cache: dict[int, tuple] = {}
        self.versions = [0] * len(self.addresses)

    def handshake(self, initial: dict[torch.dtype, torch.Tensor] | None) -> bool:
        """Check every shard holds this model; initialise the empty ones from ``initial``.

        With ``initial`` None (an evaluator), waits until a worker has initialised every shard.

        Returns:
            True if this call initialised at least one shard.

        Raises:
            ModelMismatchError: a shard holds a different model, or is listed out of order.
            LayoutMismatchError: a shard holds a different partitioner.
            ConsistencyMismatchError: the shards run different consistency settings.
            ShardTimeoutError / ShardUnavailableError: a shard did not answer in time.
        """
        # Every shard's settings are compared before any is initialised, so a mismatched
        # cluster is refused untouched.
        replies = self.wait([self._submit(i, self._hello) for i in range(self.num_shards)])
        self.consistency = self._agreed_consistency(
            [dict(reply.get("consistency", self.consistency)) for reply in replies]
        )
        futures = [self._submit(i, self._join, replies[i], initial) for i in range(self.num_shards)]
        return any(self.wait(futures))

    def _agreed_consistency(self, described: list[dict]) -> dict:
        """The consistency settings every shard described, which must all be equal."""
        first = described[0]
        for shard_id, settings in enumerate(described[1:], start=1):
            for key in sorted(set(first) | set(settings)):
                at_first, at_other = first.get(key, "(absent)"), settings.get(key, "(absent)")
                if at_first != at_other:
                    raise ConsistencyMismatchError(
                        f"shard 0 ({self.addresses[0]}) runs {key}={at_first!r} but shard "
                        f"{shard_id} ({self.addresses[shard_id]}) runs {key}={at_other!r}: start "
                        "every shard with the same consistency flags"
                    )
        return first

    def _identity(self, clock: int) -> dict:
        if self.worker_id is None:
            return dict(self._group_meta)
        return {**self._group_meta, "worker": self.worker_id, "clock": clock}

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
            ModelMismatchError: the shard is one of another number of shards.
        """
        reply = self._request(shard_id, Message(ops.HELLO, self._hello_meta(shard_id)))
        if reply.meta.get("num_shards") != self.num_shards:
            raise ModelMismatchError(
                f"shard {shard_id} ({self.addresses[shard_id]}) is one of "
                f"{reply.meta.get('num_shards')} shards, but {self.num_shards} were given"
            )
        return reply.meta

    def _join(self, shard_id: int, described: dict, initial) -> bool:
        """Initialise one shard from ``initial`` if it is empty (or, with ``initial`` None,
        wait until a worker has); True if it adopted ``initial``."""
        deadline = time.monotonic() + self.timeout_s
        while not described.get("initialized"):
            if initial is not None:
                tensors = self._slice_tensors(shard_id, initial)
                meta = self._hello_meta(shard_id)
                reply = self._request(shard_id, Message(ops.INIT, meta, tensors))
                return bool(reply.meta.get("adopted"))
            if time.monotonic() > deadline:
                raise ShardTimeoutError(
                    f"shard {shard_id} ({self.addresses[shard_id]}): no worker initialised it "
                    f"within {self.timeout_s:g}s"
                )
            time.sleep(_INIT_POLL_S)
            described = self._hello(shard_id)
        self.versions[shard_id] = int(described.get("version", 0))
        return False

    def _slice_tensors(self, shard_id: int, flats: dict[torch.dtype, torch.Tensor]) -> list:
        """(name, view) of each of shard ``shard_id``'s pieces of ``flats``.

        The views are made once per set of buffers: an optimizer sends the same buffers every
        step, and slicing them anew cost more than the rest of a small request's bookkeeping.
        """
        # ids are safe: the cached views keep the tensors alive, so no id is reused meanwhile.
        identity = tuple((dtype, id(t), t.data_ptr(), t.numel()) for dtype, t in flats.items())
        cached = self._slice_cache.get(id(flats))
        if cached is None or cached[0] is not flats or cached[1] != identity:
            views = [
                [(piece.name, flats[piece.dtype][piece.start : piece.stop]) for piece in pieces]
                for pieces in self.slices
            ]
            if len(self._slice_cache) >= _SLICE_CACHE_ENTRIES:
                self._slice_cache.clear()
            cached = self._slice_cache[id(flats)] = (flats, identity, views)
        return list(cached[2][shard_id])

    def push(
        self,
        flat_grads: dict[torch.dtype, torch.Tensor],
        *,
        clock: int = 0,
        base_versions: Sequence[int] | None = None,
    ) -> list[cf.Future]:
        """Send each shard its slices of ``flat_grads``; futures resolve to the new versions.

        ``flat_grads`` must not change until the futures are done (it is sent without a copy).
        ``base_versions[i]`` is shard i's version the gradient was computed from.
        """
        return self._submit_all(
            self._push_one, self._push_messages(flat_grads, clock, base_versions), now=False
        )

    def push_now(
        self,
        flat_grads: dict[torch.dtype, torch.Tensor],
        *,
        clock: int = 0,
        base_versions: Sequence[int] | None = None,
    ) -> list[int]:
        """:meth:`push` and wait: the shards' versions after it (the lowest latency path)."""
        messages = self._push_messages(flat_grads, clock, base_versions)
        return self.wait(self._submit_all(self._push_one, messages, now=True))

    def _push_messages(self, flat_grads, clock: int, base_versions) -> list[tuple[Message]]:
        messages = []
        seq = next(self._push_seq)
        for i in range(self.num_shards):
            meta = {**self._identity(clock), "seq": seq, "session": self._session}
            if base_versions is not None:
                meta["base_version"] = int(base_versions[i])
            messages.append((Message(ops.PUSH, meta, self._slice_tensors(i, flat_grads)),))
        return messages

    def _push_one(self, shard_id: int, message: Message) -> int:
        reply = self._request(shard_id, message)
        self.versions[shard_id] = int(reply.meta["version"])
        self._staleness.append(int(reply.meta.get("staleness", 0)))
        return self.versions[shard_id]

    def take_staleness(self) -> list[int]:
        """Staleness of the pushes answered since the last call (one value per shard reply)."""
        taken, self._staleness = self._staleness, []
        return taken

    def pull(
        self,
        flat_out: dict[torch.dtype, torch.Tensor],
        *,
        clock: int = 0,
        after_versions: Sequence[int] | None = None,
    ) -> list[cf.Future]:
        """Read every shard's slices straight into ``flat_out``; futures resolve to versions.

        With ``after_versions`` (sync rounds), shard i answers once its version exceeds
        ``after_versions[i]``; under SSP a shard answers once this worker may go on.
        """
        return self._submit_all(
            self._pull_one, self._pull_arguments(flat_out, clock, after_versions), now=False
        )

    def pull_now(
        self,
        flat_out: dict[torch.dtype, torch.Tensor],
        *,
        clock: int = 0,
        after_versions: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:
        """:meth:`pull` and wait (``timeout_s`` as in :meth:`wait`): the shards' versions."""
        arguments = self._pull_arguments(flat_out, clock, after_versions)
        return self.wait(self._submit_all(self._pull_one, arguments, now=True), timeout_s)

    def _pull_arguments(self, flat_out, clock: int, after_versions) -> list[tuple]:
        return [
            (
                dict(self._slice_tensors(i, flat_out)),
                clock,
                None if after_versions is None else int(after_versions[i]),
            )
            for i in range(self.num_shards)
        ]

    def _pull_one(self, shard_id: int, targets: dict, clock: int, after_version) -> int:
        def sink(name, dtype, shape):
            return targets.get(name)

        meta = self._identity(clock)
        if after_version is not None:
            meta["after_version"] = after_version
        meta["max_wait_s"] = self.timeout_s / 2  # answered well inside this request's timeout
        deadline = time.monotonic() + self.hold_timeout_s
        reply = self._request(shard_id, Message(ops.PULL, meta), sink=sink)
        while reply.meta.get("held"):
            if time.monotonic() > deadline:
                raise ShardTimeoutError(
                    f"shard {shard_id} ({self.addresses[shard_id]}): pull held for "
                    f"{self.hold_timeout_s:g}s waiting for slower workers"
                )
            reply = self._request(shard_id, Message(ops.PULL, meta), sink=sink)
        if [name for name, _ in reply.tensors] != list(targets):
            raise ModelMismatchError(f"shard {shard_id} sent {[n for n, _ in reply.tensors]}")
        self.versions[shard_id] = int(reply.meta["version"])
        return self.versions[shard_id]

    def wait_for_version(self, min_version: int, timeout_s: float) -> list[int]:
        """Block until every shard has applied at least ``min_version`` updates.

        Raises:
            ShardTimeoutError: not reached within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            versions = [int(s["version"]) for s in self.stats()]
            if min(versions) >= min_version:
                return versions
            if time.monotonic() > deadline:
                raise ShardTimeoutError(
                    f"shards reached versions {versions}, not {min_version}, in {timeout_s:g}s"
                )
            time.sleep(_INIT_POLL_S)

    def stats(self) -> list[dict]:
        """Each shard's counters (version, pushes, pulls, bytes)."""
        futures = [
            self._submit(
                i, lambda i: self._request(i, Message(ops.STATS, dict(self._group_meta))).meta
            )
            for i in range(self.num_shards)
        ]
        return self.wait(futures)
