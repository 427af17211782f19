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
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import torch

from distbelief.client.compression import EncodedPush, HeldValues, NarrowPullStaging
from distbelief.client.handshake import INIT_POLL_S, ShardHandshake, check_shard_count
from distbelief.client.lanes import RECENT_KEPT, ShardLanes
from distbelief.client.pulls import ShardPulls
from distbelief.client.replay import Replay, ShardReplay
from distbelief.client.shared_memory import SharedMemory
from distbelief.config import check_count, check_wait
from distbelief.errors import (
    DistBeliefError,
    ModelMismatchError,
    PlacementRefusedError,
    RemoteError,
    ShardTimeoutError,
)
from distbelief.sharding import (
    FlatPartitioner,
    Partitioner,
    ShardSlice,
    TensorSpec,
    layout_fingerprint,
)
from distbelief.sharding.layout import group_sizes
from distbelief.wire import Message, ops
from distbelief.wire.channels.shm import transport_setting
from distbelief.wire.compression import (
    SPARSE_KEY,
    WireCompression,
    decode_push_into,
    is_encoded,
)
from distbelief.wire.group_names import check_group_name
from distbelief.wire.security import WireSecurity
from distbelief.wire.shared_params import DIRECT_READS_KEY, PLACED_KEY
from distbelief.wire.warmstart_ops import WARMSTART_ENDED_KEY

_SLICE_CACHE_ENTRIES = 8
"""Sets of buffers whose slices are kept (an optimizer uses two: gradients out, params in)."""
__all__ = ["ParameterServerClient", "check_shard_count"]

logger = logging.getLogger(__name__)


def _identity(flats: dict) -> tuple:
    """What tells one set of flat buffers from another (what their slices' views depend on)."""
    return tuple((dtype, id(t), t.data_ptr(), t.numel()) for dtype, t in flats.items())


def _checked_specs(specs: object) -> list[TensorSpec]:
    """``specs`` as a list; TypeError naming it unless it holds TensorSpecs only."""
    if isinstance(specs, Iterable) and not isinstance(specs, str | bytes):
        listed = list(specs)
        if all(isinstance(spec, TensorSpec) for spec in listed):
            return listed
    raise TypeError(f"specs must be a list of TensorSpec, got {specs!r}")


def _check_arguments(worker_id, partitioner, num_workers, *flags) -> None:
    """Refuses constructor arguments of the wrong type, naming them (TypeError; ValueError for
    ``num_workers``, a count)."""
    if worker_id is not None and not isinstance(worker_id, str):
        raise TypeError(f"worker_id must be a str, got {worker_id!r}")
    if partitioner is not None and not all(
        callable(getattr(partitioner, method, None)) for method in ("partition", "to_json")
    ):
        raise TypeError(f"partitioner must be a Partitioner, got {partitioner!r}")
    if num_workers is not None:
        check_count("num_workers", num_workers)
    for name, value in zip(("pull_changes", "shared_memory"), flags, strict=True):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def _memory_channels(client: ShardLanes) -> Callable[[int], object | None]:
    """Shard i's connection of ``client`` if it is a shared-memory channel, else None. The
    client is held weakly: its shared memory, which asks this, is released when the client is
    collected, and must not keep it alive."""
    client_ref = weakref.ref(client)

    def channel_of(shard_id: int) -> object | None:
        owner = client_ref()
        return None if owner is None else owner._transports[shard_id].memory_channel

    return channel_of


class ParameterServerClient(ShardHandshake, ShardPulls, ShardLanes):
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
            sequence number, so a retried push is applied once. A shard that comes back from a
            checkpoint is first re-sent this client's pushes the checkpoint lacks (kept in
            ``replays``, for shards that save periodic checkpoints).
        security: Authentication key and TLS settings of the job.
        partitioner: Which slices each shard owns (default: byte-balanced flat); every shard
            must hold an equal one, which the handshake checks.
        group: The parameter group on the shards these parameters are (a model-parallel
            partition's, say: each group has its own layout, version and optimizer state);
            "" is the default group.
        pull_dtype: Pulls ask the shards for floating slices narrowed to this dtype
            (bfloat16 or float16) and widen them into the caller's buffers; None: as they are.
            (A push travels as given: ``EncodedPush`` for a compressed one.)
        source_host: The address of this machine the connections leave from (default: the
            one the operating system picks).
        pull_changes: A pull into the same buffers as the last asks each shard for the
            elements changed since (sent sparse when few did: after top-k pushes to a shard
            whose optimizer moves only pushed elements). The buffers must then be written by
            pulls only.
        num_workers: The job's number of workers, as this worker was told it: shards that run
            sync rounds of another number are refused at the handshake (a round of the wrong
            size would wait for missing workers, or close before all of them pushed). None:
            not checked (an evaluator, say).
        shared_memory: With shards on this host (over shared-memory channels), read their
            parameters from their shared memory and place pushes in shared buffers
            (``client/shared_memory.py``). False: every pull and push is a request.
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
        pull_dtype: torch.dtype | None = None,
        source_host: str | None = None,
        pull_changes: bool = False,
        num_workers: int | None = None,
        shared_memory: bool = True,
    ) -> None:
        check_wait("hold_timeout_s", hold_timeout_s)
        check_group_name(group)
        specs = _checked_specs(specs)
        _check_arguments(worker_id, partitioner, num_workers, pull_changes, shared_memory)
        super().__init__(
            addresses,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            retry_timeout_s=retry_timeout_s,
            security=security,
            source_host=source_host,
        )
        self.worker_id = worker_id
        self.num_workers = num_workers
        self.group = group
        self._group_meta = {"group": group} if group else {}
        self.hold_timeout_s = hold_timeout_s
        self._push_seq = itertools.count(1)
        # One session per client life: a restarted worker's numbering starts afresh.
        self._session = secrets.token_hex(8)
        # Replays have a numbering of their own: one can be sent while later pushes wait.
        self._replay_session = f"{self._session}.replay"
        self._replay_seq = itertools.count(1)
        self.consistency: dict = {"sync": False, "max_staleness": None}
        """The shards' consistency settings, as every shard described them at the handshake."""
        self._staleness: deque[int] = deque(maxlen=RECENT_KEPT)
        self.specs = specs
        self.fingerprint = layout_fingerprint(self.specs)
        self.partitioner: Partitioner = partitioner or FlatPartitioner()
        self.slices: list[list[ShardSlice]] = self.partitioner.partition(
            self.specs, len(self.addresses)
        )
        self._slice_cache: dict[int, tuple] = {}
        self._flat_sizes = group_sizes(self.specs)
        self.versions = [0] * len(self.addresses)
        self.pushed_steps: list[int | None] = [None] * len(self.addresses)
        """Per shard, as its handshake said: the step of the last push it took from this
        worker id (an earlier life's, for a restarted worker); None: none."""
        self.replays = [ShardReplay() for _ in self.addresses]
        """Per shard, this worker's pushes its last checkpoint may lack (``client/replay.py``),
        re-sent once if it restarts from that checkpoint. Pushers with a worker id only; under
        sync rounds it holds no push, and a restart is only reported the version seen."""
        self._pull_meta = WireCompression(dtype=pull_dtype).pull_meta()
        self._pull_staging = None if pull_dtype is None else NarrowPullStaging(pull_dtype)
        self._held = HeldValues(len(self.addresses)) if pull_changes else None
        # Same-host shards get pushes through shared memory, and their parameters are read
        # from it: not when pulls are narrowed or sparse (their results must not depend on
        # where the shard runs).
        self._shared_memory = (
            SharedMemory(
                [[(p.numel, p.dtype) for p in pieces] for pieces in self.slices],
                reads=pull_dtype is None and not pull_changes,
                channel_of=_memory_channels(self),
            )
            if shared_memory and transport_setting() != "tcp"
            else None
        )
        if self._shared_memory is not None:
            self._owned.append(self._shared_memory)
        elif shared_memory:
            logger.debug("pulls and pushes by request: the transport is tcp")

    def _identity(self, clock: int) -> dict:
        if self.worker_id is None:
            return dict(self._group_meta)
        return {**self._group_meta, "worker": self.worker_id, "clock": clock}

    def slice_views(self, shard_id: int, flats: object, argument: str = "flats") -> list:
        """(name, view) of each of shard ``shard_id``'s pieces of ``flats``, the flat buffers
        the caller passed as ``argument`` (named so in a refusal).

        The views are made once per set of buffers: an optimizer sends the same buffers every
        step, and slicing them anew cost more than the rest of a small request's bookkeeping.

        Raises:
            TypeError / ValueError: ``flats`` is not one 1-D buffer per dtype of the layout,
                of exactly its size (``_check_flats``).
        """
        # ids are safe: the cached views keep the tensors alive, so no id is reused meanwhile.
        cached = self._slice_cache.get(id(flats))
        if cached is None or cached[0] is not flats or cached[1] != _identity(flats):
            self._check_flats(flats, argument)
            identity = _identity(flats)
            views = [
                [(piece.name, flats[piece.dtype][piece.start : piece.stop]) for piece in pieces]
                for pieces in self.slices
            ]
            if len(self._slice_cache) >= _SLICE_CACHE_ENTRIES:
                self._slice_cache.clear()
            cached = self._slice_cache[id(flats)] = (flats, identity, views)
        return list(cached[2][shard_id])

    def _check_flats(self, flats: object, argument: str) -> None:
        """Refuses flat buffers that are not one 1-D tensor per dtype of the layout, of exactly
        its size: a larger one would be read or filled only in part, without a word.

        Raises:
            TypeError / ValueError: naming ``argument`` and the dtype whose buffer does not fit.
        """
        if not isinstance(flats, dict):
            raise TypeError(
                f"{argument} must be a dict of dtype -> 1-D tensor, got {type(flats).__name__}"
            )
        for dtype in flats:
            if dtype not in self._flat_sizes:
                raise ValueError(
                    f"{argument}[{dtype}]: the model's layout has no {dtype} parameters "
                    f"(its dtypes: {', '.join(map(str, self._flat_sizes))})"
                )
        for dtype, size in self._flat_sizes.items():
            flat = flats.get(dtype)
            if not isinstance(flat, torch.Tensor):
                raise TypeError(f"{argument}: no {dtype} tensor (got {type(flat).__name__})")
            if flat.dtype != dtype or flat.dim() != 1 or flat.numel() != size:
                raise ValueError(
                    f"{argument}[{dtype}] must be a 1-D {dtype} tensor of {size} elements (the "
                    f"model's layout), got {flat.dtype} {list(flat.shape)} ({flat.numel()} "
                    "elements)"
                )

    def push(
        self,
        flat_grads: dict[torch.dtype, torch.Tensor] | EncodedPush,
        *,
        clock: int = 0,
        base_versions: Sequence[int] | None = None,
        ready: Callable[[], object] | None = None,
    ) -> list[cf.Future]:
        """Send each shard its slices of ``flat_grads`` (or its tensors of an encoded push);
        futures resolve to the new versions.

        ``flat_grads`` must not change until the futures are done (it is sent without a copy).
        ``base_versions[i]`` is shard i's version the gradient was computed from. ``ready``
        is called before each shard's request is sent: it waits until ``flat_grads`` holds
        the gradient (a copy from a GPU still running, say). A shard whose ``held_steps``
        reach ``clock`` is sent nothing (its future resolves to its version as last seen).

        Raises:
            TypeError / ValueError: ``flat_grads`` is not one 1-D tensor per dtype of the
                layout, of exactly its size, or ``clock`` no integer >= 0, or
                ``base_versions`` not one integer >= 0 per shard; nothing is sent.
        """
        return self._submit_all(
            self._push_one, self._push_messages(flat_grads, clock, base_versions, ready), now=False
        )

    def push_now(
        self,
        flat_grads: dict[torch.dtype, torch.Tensor] | EncodedPush,
        *,
        clock: int = 0,
        base_versions: Sequence[int] | None = None,
        ready: Callable[[], object] | None = None,
    ) -> list[int]:
        """:meth:`push` and wait: the shards' versions after it (the lowest latency path)."""
        messages = self._push_messages(flat_grads, clock, base_versions, ready)
        return self.wait(self._submit_all(self._push_one, messages, now=True))

    def _connection_lost(self, shard_id: int) -> None:
        if self._shared_memory is not None:
            self._shared_memory.connection_lost(shard_id)

    def close(self, wait: bool = True) -> None:
        super().close(wait)
        # The cached views hold the buffers sent: a shared outbox would stay mapped.
        self._slice_cache.clear()

    def _push_messages(self, flat_grads, clock: int, base_versions, ready) -> list[tuple]:
        base_versions = self.checked_schedule(clock, "base_versions", base_versions)
        messages = []
        seq = next(self._push_seq)
        encoded = isinstance(flat_grads, EncodedPush)
        for i in range(self.num_shards):
            if self.holds(i, clock):
                messages.append((None, None))  # that shard took this step from a dead life
                continue
            meta = {**self._identity(clock), "seq": seq, "session": self._session}
            if self._shared_memory is not None and (reads := self._shared_memory.take_count(i)):
                meta[DIRECT_READS_KEY] = reads
            if base_versions is not None:
                meta["base_version"] = base_versions[i]
            if encoded:
                meta.update(flat_grads.meta)
                tensors = list(flat_grads.shard_tensors[i])
            else:
                tensors = self.slice_views(i, flat_grads, "flat_grads")
            messages.append((Message(ops.PUSH, meta, tensors), ready))
        return messages

    def _push_one(self, shard_id: int, message: Message | None, ready=None) -> int:
        if message is None:  # a shard left out (``held_steps``)
            return self.versions[shard_id]
        if ready is not None:
            ready()
        placed = self._placed(shard_id, message)
        try:
            reply = self._pushed_or_told_why(shard_id, placed)
        except PlacementRefusedError as e:
            if placed is message:
                raise
            # Retried on a shard that cannot map this memory (restarted as TCP only, say):
            # nothing was applied, and the tensors themselves go instead.
            logger.info("shard %d: %s; sending the push's tensors", shard_id, e)
            placed = message
            reply = self._pushed_or_told_why(shard_id, message)
        if placed is not message:
            self._wire.add_shared(pushed=sum(tensor.nbytes for _, tensor in message.tensors))
        meta = reply.meta
        self.versions[shard_id] = int(meta["version"])
        self._staleness.append(int(meta.get("staleness", 0)))
        if self.worker_id is not None:
            # Under sync rounds a restart costs the rounds since the checkpoint whatever a
            # worker holds: a round's averaged update is no worker's own to re-send, nor does
            # a push in flight bring one back. The worker only reports the version it saw.
            rounds = self.consistency.get("sync")
            in_flight = 0 if rounds or meta.get("dup") else 1
            replay = self.replays[shard_id].observe(meta, in_flight=in_flight)
            if meta.get("applied", True) and not rounds:
                self.replays[shard_id].record(meta, self._pushed(shard_id, message))
            if replay is not None:
                self._resend(shard_id, replay)
        return self.versions[shard_id]

    def _pushed_or_told_why(self, shard_id: int, push: Message) -> Message:
        """The reply to ``push``. A shard that refuses it as not fitting its slices may be one
        restarted from another model's checkpoint (a ps started again on the wrong folder):
        asked as a new worker asks, it then says so, naming the first tensor that differs,
        where the push's refusal named none.

        Raises:
            ModelMismatchError: the shard holds another model (or layout).
            RemoteError: the shard refused the push otherwise.
        """
        try:
            return self._request(shard_id, push)
        except RemoteError as refused:
            if type(refused) is not RemoteError:  # a refusal that says what it is already
                raise
            try:
                self._request(shard_id, Message(ops.HELLO, self._hello_meta(shard_id)))
            except ModelMismatchError:
                raise
            except DistBeliefError:  # the hello tells nothing more: the refusal stands
                pass
            raise

    def _placed(self, shard_id: int, message: Message) -> Message:
        """``message``, or the same push with its gradient in the push buffers a same-host
        shard maps (its tensors then stay here)."""
        if self._shared_memory is None or is_encoded(message.meta):
            return message
        placed = self._shared_memory.place(
            shard_id,
            [tensor for _, tensor in message.tensors],
            lambda offer: self._share_offer(shard_id, message.meta.get("clock", 0), offer),
        )
        if placed is None:
            return message
        return Message(ops.PUSH, {**message.meta, PLACED_KEY: placed})

    def _pushed(self, shard_id: int, message: Message) -> list[torch.Tensor]:
        """What a push adds to the shard's slices, whatever its encoding (what a replay sums)."""
        if not is_encoded(message.meta):
            return [tensor for _, tensor in message.tensors]
        pieces = self.slices[shard_id]
        outs = [torch.zeros(piece.numel, dtype=piece.dtype) for piece in pieces]
        decode_push_into(
            outs,
            [piece.name for piece in pieces],
            message.tensors,
            sparse=SPARSE_KEY in message.meta,
        )
        return outs

    def _settle(self, shard_id: int, meta: dict) -> bool:
        """Take in a reply's checkpoint description; if the shard restarted, re-send it what
        its checkpoint lacks. True if anything was re-sent (a pull must then be repeated)."""
        if self.worker_id is None:
            return False
        replay = self.replays[shard_id].observe(meta)
        if replay is None:
            return False
        self._resend(shard_id, replay)
        return replay.count > 0

    def _resend(self, shard_id: int, replay: Replay | None) -> None:
        """Send ``replay`` (numbered, so a retry is applied once); if the shard restarted yet
        again meanwhile, the next replay too, until a life has everything. Under sync rounds
        ``replay`` holds no push: it only reports the version seen of the life before."""
        while replay is not None:
            self._log_restart(shard_id, replay)
            meta = {
                **self._group_meta,
                "worker": self.worker_id,
                "session": self._replay_session,
                "seq": next(self._replay_seq),
                "replay": replay.count,
                "resent": replay.resent,
                "seen": replay.seen_version,
            }
            tensors = []
            if replay.tensors is not None:
                pieces = self.slices[shard_id]
                tensors = [
                    (piece.name, total.to(piece.dtype))
                    for piece, total in zip(pieces, replay.tensors, strict=True)
                ]
            reply = self._pushed_or_told_why(shard_id, Message(ops.PUSH, meta, tensors))
            self.versions[shard_id] = int(reply.meta["version"])
            in_flight = 0 if reply.meta.get("dup") else replay.count
            buffer = self.replays[shard_id]
            replay_next = buffer.observe(reply.meta, in_flight=in_flight)
            if replay.tensors is not None:
                buffer.record(reply.meta, replay.tensors, count=replay.count)
            replay = replay_next

    def _log_restart(self, shard_id: int, replay: Replay) -> None:
        where = f"shard {shard_id} ({self.addresses[shard_id]}) restarted from a checkpoint"
        if self.consistency.get("sync"):
            logger.warning(
                "%s: the rounds since it are lost (this worker saw version %d before)",
                where,
                replay.seen_version,
            )
            return
        if not replay.count:  # it saved as it stopped (SIGTERM, say): nothing was lost
            logger.info("%s: it lacks none of this worker's pushes", where)
            return
        logger.warning("%s: re-sending the sum of %d pushes it lacks", where, replay.count)

    def take_staleness(self) -> list[int]:
        """Staleness of the pushes answered since the last call (one value per shard reply; the
        last ``RECENT_KEPT`` of them)."""
        taken, self._staleness = self._staleness, deque(maxlen=RECENT_KEPT)
        return list(taken)

    def shared_outbox(self, sizes: dict[torch.dtype, int]) -> dict[torch.dtype, torch.Tensor]:
        """Zeroed flat buffers by dtype for gradients to push: in shared memory where shards on
        this host may map it, so a push from them goes with no copy at all (the shard applies
        it where it lies); ordinary memory otherwise."""
        shared = None if self._shared_memory is None else self._shared_memory.outbox(sizes)
        if shared is not None:
            return shared
        return {dtype: torch.zeros(total, dtype=dtype) for dtype, total in sizes.items()}

    def wait_for_version(self, min_version: int, timeout_s: float) -> list[int]:
        """Block until every shard has applied at least ``min_version`` updates, or a shard
        says the warm start is over (``END_WARMSTART``: the replica whose updates are awaited
        was given up); returns the shards' versions.

        Raises:
            ValueError: ``min_version`` is no integer >= 0, or ``timeout_s`` no time to wait.
            ShardTimeoutError: neither within ``timeout_s``.
        """
        check_count("min_version", min_version, least=0)
        check_wait("timeout_s", timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            versions = [int(s["version"]) for s in stats]
            # Any shard will do: one restarted since it was told has forgotten it.
            if min(versions) >= min_version or any(s.get(WARMSTART_ENDED_KEY) for s in stats):
                return versions
            if time.monotonic() > deadline:
                raise ShardTimeoutError(
                    f"shards reached versions {versions}, not {min_version}, in {timeout_s:g}s"
                )
            time.sleep(INIT_POLL_S)

    def stats(self) -> list[dict]:
        """Each shard's counters (version, pushes, pulls, bytes)."""
        futures = [
            self._submit(
                i, lambda i: self._request(i, Message(ops.STATS, dict(self._group_meta))).meta
            )
            for i in range(self.num_shards)
        ]
        return self.wait(futures)
