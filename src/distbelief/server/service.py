"""The shard's request loop logic: decode a request, call the ParameterShard, encode the reply.

Pushes are received into, and pulls sent from, reusable slice buffers, so a shard allocates
nothing per request once warm. A connection borrows a set of them for as long as it is being
answered and, on a serving pool, gives it back when it goes idle: the sets in use are bounded by
the serving threads, not by the connections (2,000 replicas of a 1 MB slice would otherwise hold
4 GB). Sandblaster's ops (vector programs, gradient bundles, reads of a named vector) are
answered in ``server/vector_service.py``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from distbelief.errors import PlacementRefusedError, ProtocolError
from distbelief.server.compressed import (
    CompressedSlices,
    changes_tensors,
    max_changed_elements,
)
from distbelief.server.groups import ShardGroups
from distbelief.server.row_service import describe_tables, register_row_ops
from distbelief.server.row_tables import RowTableSettings, ShardTables
from distbelief.server.shard import ParameterShard, check_listed_place
from distbelief.server.vector_service import VectorHandlers
from distbelief.sharding import partitioner_from_json, specs_from_json
from distbelief.wire import long_wait
from distbelief.wire.channels.shm import transport_setting
from distbelief.wire.compression import (
    DTYPE_KEY,
    GENERATION_KEY,
    SINCE_KEY,
    SPARSE_KEY,
    is_encoded,
    requested_dtype,
)
from distbelief.wire.framing import Sink
from distbelief.wire.group_names import DEFAULT_GROUP, INITIALIZED_GROUPS_KEY, check_group_name
from distbelief.wire.message import Message
from distbelief.wire.ops import (
    ACCUMULATE,
    HELLO,
    INIT,
    PULL,
    PUSH,
    PUSHED_STEP_KEY,
    READ,
    SHARE,
    STATS,
    VECTORS,
    OpRegistry,
)
from distbelief.wire.shared_params import DIRECT_READS_KEY, PLACED_KEY, map_push_buffers
from distbelief.wire.warmstart_ops import END_WARMSTART, WARMSTART_ENDED_KEY

logger = logging.getLogger(__name__)

_MAX_PLACED_PER_CONNECTION = 4
"""Places of push buffers one connection keeps mapped (a client pushes from one or two)."""
_MAX_HOLD_S = 600.0
"""The longest a client may ask a shard to hold a pull in one request."""


@contextlib.contextmanager
def _holding(lock: threading.Lock) -> Iterator[None]:
    """``lock`` held for the block; a wait for it (an INIT writing its first checkpoint) lends
    a serving pool's thread's place to another, as a held pull does; no wait parks nothing."""
    if not lock.acquire(blocking=False):
        with long_wait():
            lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _optional_int(meta: dict, key: str) -> int | None:
    value = meta.get(key)
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    return value


def _push_sequence(meta: dict) -> tuple[str, int] | None:
    number, session = _optional_int(meta, "seq"), meta.get("session")
    if number is None:
        return None
    if not isinstance(session, str) or not 0 < len(session) <= 64:
        raise ValueError(f"a push with seq needs a session string, got {session!r}")
    return session, number


class SliceBuffers:
    """Buffers for one shard's slices: a push is received into ``push``, a pull is sent from
    ``pull``, which holds the parameters of the shard's ``generation`` (None: nothing yet)."""

    __slots__ = ("generation", "pull", "pull_tensors", "push")

    def __init__(self, shard: ParameterShard) -> None:
        shard.require_initialized()
        pieces = shard.slices
        self.push = {piece.name: torch.empty(piece.numel, dtype=piece.dtype) for piece in pieces}
        self.pull = [torch.empty(piece.numel, dtype=piece.dtype) for piece in pieces]
        self.pull_tensors = list(zip([piece.name for piece in pieces], self.pull, strict=True))
        self.generation: int | None = None


class ShardService:
    """Serves one ParameterShard to many connections (a ``wire.Service``).

    ``handlers`` holds the parameter-server ops; a capability adds its own ops' handlers there
    (each gets the connection's ShardConnection) before the service is served.

    Args:
        shard: The shard to serve (the default parameter group's).
        checkpoint_dir: Where a vector program that asks for a checkpoint (``"checkpoint":
            TAG``) saves the shard: ``<checkpoint_dir>/TAG/``. None: such requests are refused.
        groups: The process's parameter groups (``server/groups.py``); a connection serves the
            group its first request names (meta ``group``). None: the default group only.
        tables: The process's embedding tables (``server/row_tables.py``), served by the row
            ops. None: tables made with the default row settings.

    Raises:
        TypeError: ``shard`` is not a ParameterShard.
    """

    def __init__(
        self,
        shard: ParameterShard,
        checkpoint_dir: str | Path | None = None,
        *,
        groups: ShardGroups | None = None,
        tables: ShardTables | None = None,
    ) -> None:
        if not isinstance(shard, ParameterShard):
            raise TypeError(f"shard must be a ParameterShard, got {type(shard).__name__}")
        self.shard = shard
        self.tables = (
            tables
            if tables is not None
            else ShardTables(shard.shard_id, shard.num_shards, RowTableSettings())
        )
        self.groups = groups if groups is not None else ShardGroups(shard)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.bytes_received = 0
        self.bytes_sent = 0
        self.bytes_shared = 0
        """Bytes that moved through shared memory instead of a socket: gradients applied from
        a client's memory, and parameters clients copied from the shard's."""
        self.worker_hosts: dict[str, str] = {}
        """Worker id -> the host its latest connection came from (where each replica runs)."""
        self.warmstart_ended = False
        """Told ``END_WARMSTART``: workers waiting for the warm start's version start now."""
        self.initialising = threading.Lock()
        """Held by an INIT while it adopts the parameters and writes the first checkpoint, and
        by a HELLO while it describes the shard: no client joins a shard held in memory only
        (killed before that checkpoint is on disk, it restarts empty, and a client joined
        meanwhile would find it so; one still helloing reconnects and finds it empty, as at
        a job's start)."""
        self._stats_lock = threading.Lock()
        self._free_buffers: dict[ParameterShard, list[SliceBuffers]] = {}
        self._buffers_lock = threading.Lock()
        self.handlers = OpRegistry()
        self.handlers.register(HELLO, ShardConnection._hello)
        self.handlers.register(INIT, ShardConnection._init)
        self.handlers.register(PUSH, ShardConnection._push, sink_for=ShardConnection._push_sink_for)
        self.handlers.register(PULL, ShardConnection._pull)
        self.handlers.register(STATS, ShardConnection._stats)
        self.handlers.register(VECTORS, ShardConnection._vectors)
        self.handlers.register(
            ACCUMULATE, ShardConnection._accumulate, sink_for=ShardConnection._accumulate_sink_for
        )
        self.handlers.register(READ, ShardConnection._read)
        self.handlers.register(SHARE, ShardConnection._share)
        self.handlers.register(END_WARMSTART, ShardConnection._end_warmstart)
        register_row_ops(self.handlers)

    def open_connection(self, peer: str) -> ShardConnection:
        """State for a new connection from ``peer``."""
        logger.debug("shard %d: connection from %s", self.shard.shard_id, peer)
        return ShardConnection(self, peer)

    def borrow_buffers(self, shard: ParameterShard) -> SliceBuffers:
        """A set of slice buffers of ``shard`` (a parameter group's), free until given back.

        Raises:
            ValueError: the shard is not initialised yet.
        """
        with self._buffers_lock:
            free = self._free_buffers.get(shard)
            if free:
                return free.pop()  # the last given back: warm in cache
        return SliceBuffers(shard)

    def give_back_buffers(self, shard: ParameterShard, buffers: SliceBuffers) -> None:
        """Returns buffers ``borrow_buffers`` lent, for the next request to reuse."""
        with self._buffers_lock:
            self._free_buffers.setdefault(shard, []).append(buffers)

    def count_bytes(self, received: int, sent: int, shared: int = 0) -> None:
        """Adds one request's bytes to the totals the shard reports (``shared``: bytes that
        moved through shared memory, not the socket)."""
        with self._stats_lock:
            self.bytes_received += received
            self.bytes_sent += sent
            self.bytes_shared += shared


class ShardConnection(VectorHandlers):
    """Per-connection state: the peer's worker id and group, and the slice buffers it borrows
    while it is answered (kept until ``idle``; a thread per connection never calls it)."""

    def __init__(self, service: ShardService, peer: str) -> None:
        self.service = service
        self.shard = service.shard
        self.peer = peer
        self._compressed: CompressedSlices | None = None
        # A pull's send buffer holds the last snapshot sent from it, so a pull with no update
        # since skips the copy. (What dc-asgd needs of it, the shard's policy keeps per worker
        # id, so it survives a reconnect.)
        self._buffers: SliceBuffers | None = None
        self._placed: dict[str, list[torch.Tensor]] = {}
        """Push buffers of a client on this host, mapped: a view per slice, by where they lie
        (the client's own push buffers, or its outbox)."""
        self.worker: str | None = None
        self.group: str | None = None
        """The parameter group this connection serves, set by the first request naming one."""

    def _bind_group(self, meta: dict) -> None:
        """Serve the group ``meta`` names (default: the default group) on this connection; a
        connection serves one group for its whole life (its buffers are that group's)."""
        name = check_group_name(meta.get("group", DEFAULT_GROUP))
        if self.group is None:
            self.shard = self.service.groups.get(name)
            self.group = name
        elif name != self.group:
            raise ValueError(
                f"this connection serves parameter group {self.group!r}, not {name!r}: "
                "use one connection per group"
            )

    @functools.cached_property
    def _slice_names(self) -> list[str]:
        # Only read once the shard is initialised; its slices never change after that.
        return [piece.name for piece in self.shard.slices]

    @functools.cached_property
    def _slice_bytes(self) -> int:
        return sum(piece.numel * piece.dtype.itemsize for piece in self.shard.slices)

    def idle(self) -> None:
        """Answered, waiting for the next request: the buffers go back to the service."""
        buffers, self._buffers = self._buffers, None
        if buffers is not None:
            self.service.give_back_buffers(self.shard, buffers)

    def close(self) -> None:
        self.idle()
        self._placed = {}  # the client's push buffers are unmapped with their last view
        if self.worker is not None:
            self.shard.leave(self.worker)

    def _compressed_slices(self) -> CompressedSlices:
        """Buffers of this connection's narrowed and top-k traffic (made on first use)."""
        if self._compressed is None:
            self._compressed = CompressedSlices(self.shard.slices)
        return self._compressed

    def _borrowed(self) -> SliceBuffers:
        if self._buffers is None:
            self._buffers = self.service.borrow_buffers(self.shard)
        return self._buffers

    def _push_sink_for(self, request: Message) -> Sink:
        # Only pushes reuse buffers: INIT allocates fresh tensors the shard keeps.
        if self.group is None:
            self._bind_group(request.meta)
        buffers = self._borrowed()
        if is_encoded(request.meta):
            return functools.partial(self._compressed_slices().push_sink, buffers.push)
        return self._push_sink

    def _push_sink(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        assert self._buffers is not None
        buffer = self._buffers.push.get(name)
        if buffer is None:
            owned = ", ".join(self._buffers.push)
            raise ProtocolError(f"shard {self.shard.shard_id} does not own {name!r} (owns {owned})")
        if buffer.dtype != dtype or tuple(buffer.shape) != shape:
            raise ProtocolError(f"tensor {name!r}: expected {buffer.dtype} {list(buffer.shape)}")
        return buffer

    def _hello(self, request: Message) -> Message:
        self._bind_group(request.meta)
        # Only noted as connected (even if refused below): a worker joins the clocks at its
        # first pull or push, so one waiting for a warmstart does not hold the others back.
        worker, _clock = self._identify(request.meta)
        check_listed_place(self.shard.shard_id, self.shard.num_shards, request.meta.get("shard_id"))
        self._check_model(request.meta)
        with _holding(self.service.initialising):  # a first checkpoint may be under way
            described = self._describe()
        if worker in self.shard.pushed_steps:
            # A restarted worker learns the step of the last push its dead life got applied.
            described[PUSHED_STEP_KEY] = self.shard.pushed_steps[worker]
        return request.reply(described)

    def _check_model(self, meta: dict) -> None:
        """Refuse a client whose partitioner or (once initialised) layout differs."""
        if "partitioner" in meta:
            self.shard.check_partitioner(partitioner_from_json(meta["partitioner"]))
        if "specs" in meta:
            self.shard.check_layout(specs_from_json(meta["specs"]))

    def _identify(self, meta: dict) -> tuple[str | None, int]:
        """The worker id and clock a request carries (the shard's push and pull register the
        worker's clock themselves, under the lock they take anyway)."""
        worker, clock = meta.get("worker"), meta.get("clock", 0)
        if worker is not None and not isinstance(worker, str):
            raise ValueError(f"worker id must be a string, got {worker!r}")
        if type(clock) is not int or clock < 0:
            raise ValueError(f"clock must be an integer >= 0, got {clock!r}")
        if worker is not None and worker != self.worker:
            if self.worker is not None:
                self.shard.leave(self.worker)
            self.shard.arrive(worker)
            self.worker = worker
            self.service.worker_hosts[worker] = self.peer.rpartition(":")[0]
        return worker, clock

    def _describe(self) -> dict:
        counters = self.shard.counters()
        described = {
            "shard_id": self.shard.shard_id,
            "num_shards": self.shard.num_shards,
            "initialized": self.shard.initialized,
            "fingerprint": self.shard.fingerprint,
            "version": counters.version,
            "consistency": self.shard.policy.describe(),
            "partitioner": self.shard.partitioner.to_json(),
            # A client of the whole model meeting a partitioned one's groups (or the other
            # way round) is told so at once, instead of waiting for an INIT that never comes.
            INITIALIZED_GROUPS_KEY: sorted(
                name for name, shard in self.service.groups.shards().items() if shard.initialized
            ),
        }
        durable = self.shard.describe_durability()
        if durable is not None:
            described["durable"] = durable
        if self.service.warmstart_ended:
            described[WARMSTART_ENDED_KEY] = True
        return described

    def _end_warmstart(self, request: Message) -> Message:
        """The replica the warm start waits on is gone for good (``wire/warmstart_ops.py``);
        the reply's ``versions``: each initialised group's version (what it had reached)."""
        if not self.service.warmstart_ended:
            logger.info("shard %d: warm start ended early", self.shard.shard_id)
        self.service.warmstart_ended = True
        groups = self.service.groups.shards()
        versions = {name: shard.version for name, shard in groups.items() if shard.initialized}
        return request.reply({**self._describe(), "versions": versions})

    def _init(self, request: Message) -> Message:
        self._bind_group(request.meta)
        # Checked as a HELLO is: a client that lists this shard in another place would give
        # it the slices of another shard.
        check_listed_place(self.shard.shard_id, self.shard.num_shards, request.meta.get("shard_id"))
        specs = specs_from_json(request.meta.get("specs"))
        if "partitioner" in request.meta:
            self.shard.check_partitioner(partitioner_from_json(request.meta["partitioner"]))
        names = [name for name, _ in request.tensors]
        values = [tensor for _, tensor in request.tensors]
        with _holding(self.service.initialising):
            adopted = self.shard.initialize(specs, values, names)
            if adopted:
                logger.info("shard %d initialised by %s", self.shard.shard_id, self.peer)
                assert self.group is not None  # bound above
                self.service.groups.save_first_checkpoint(self.group)
        return request.reply({"adopted": adopted, **self._describe()})

    def _push(self, request: Message) -> Message:
        if request.meta.get("group", DEFAULT_GROUP) != self.group:  # inline: a push's hot path
            self._bind_group(request.meta)
        if "replay" in request.meta:
            return self._replay(request)
        if PLACED_KEY in request.meta:
            if request.tensors:
                raise ProtocolError("a push placed in shared memory carries no tensors")
            grads = self._placed_buffers(request.meta[PLACED_KEY])
            if self.shard.adjusts_gradients:
                # Adjusted here, not in the client's memory: what it pushed stays as it was
                # (its replay record sums it).
                push = self._borrowed().push
                torch._foreach_copy_(list(push.values()), grads)
                grads = list(push.values())
            received_bytes, shared_bytes = 0, self._slice_bytes
        elif is_encoded(request.meta):
            compressed = self._compressed_slices()
            grads = compressed.decode_push(request.meta, request.tensors, self._borrowed().push)
            received_bytes, shared_bytes = sum(tensor.nbytes for _, tensor in request.tensors), 0
        else:
            names = [name for name, _ in request.tensors]
            if names != self._slice_names:
                raise ProtocolError(f"push must carry {self._slice_names}, got {names}")
            grads = [tensor for _, tensor in request.tensors]
            received_bytes, shared_bytes = self._slice_bytes, 0
        worker, clock = self._identify(request.meta)
        base_version = _optional_int(request.meta, "base_version")
        direct_reads = _optional_int(request.meta, DIRECT_READS_KEY)
        if direct_reads:
            self.shard.note_direct_reads(direct_reads)
            shared_bytes += direct_reads * self._slice_bytes
        result = self.shard.push(
            grads,
            worker=worker,
            clock=clock,
            base_version=base_version,
            seq=_push_sequence(request.meta),
            sparse=bool(request.meta.get(SPARSE_KEY)),
        )
        self.service.count_bytes(received_bytes, 0, shared_bytes)
        meta = {"version": result.version, "staleness": result.staleness, "applied": result.applied}
        if result.durable is not None:
            meta |= {"epoch": result.epoch, "durable": result.durable}
            if result.divisor != 1:
                meta["divisor"] = result.divisor
            if result.duplicate:
                meta["dup"] = True
        return request.reply(meta)

    def _replay(self, request: Message) -> Message:
        """A client's replay of its pushes that this life's checkpoint does not hold
        (``client/replay.py``): their sum as one update worth ``replay`` updates."""
        count = _optional_int(request.meta, "replay")
        worker, _clock = self._identify(request.meta)
        seq = _push_sequence(request.meta)
        if worker is None or seq is None or count is None:
            raise ValueError("a replay needs a worker id, a session and seq, and its count")
        names = [name for name, _ in request.tensors]
        if names != (self._slice_names if count else []):
            raise ProtocolError(f"a replay of {count} updates carries tensors {names}")
        result = self.shard.replay(
            [tensor for _, tensor in request.tensors],
            worker=worker,
            seq=seq,
            count=count,
            resent=_optional_int(request.meta, "resent") or 0,
            seen_version=_optional_int(request.meta, "seen") or 0,
        )
        meta = {"version": result.version, "epoch": result.epoch, "durable": result.durable}
        if result.duplicate:
            meta["dup"] = True
        return request.reply(meta)

    def _pull(self, request: Message) -> Message:
        if request.meta.get("group", DEFAULT_GROUP) != self.group:  # inline: a pull's hot path
            self._bind_group(request.meta)
        buffers = self._borrowed()
        worker, clock = self._identify(request.meta)
        if DTYPE_KEY in request.meta:
            requested_dtype(request.meta)  # refused before the pull counts or is held
        after_version = _optional_int(request.meta, "after_version")
        max_wait_s = request.meta.get("max_wait_s", 0.0)
        if (
            isinstance(max_wait_s, bool)
            or not isinstance(max_wait_s, (int, float))
            or not 0 <= max_wait_s <= _MAX_HOLD_S
        ):
            raise ValueError(f"max_wait_s must be in [0, {_MAX_HOLD_S}], got {max_wait_s!r}")
        wants_changes = SINCE_KEY in request.meta
        since, max_changed = None, 0
        if wants_changes:
            since = self._held_generation(request.meta)
            max_changed = max_changed_elements(self.shard.slices, requested_dtype(request.meta))
        pull = functools.partial(
            self.shard.pull_into,
            buffers.pull,
            worker=worker,
            clock=clock,
            after_version=after_version,
            outs_generation=buffers.generation,
            changes_since=since,
            max_changed=max_changed,
        )
        result = pull(max_wait_s=0.0)
        if result.held and max_wait_s > 0:
            # Held for slower workers (SSP, sync rounds): a serving pool lends the wait's
            # thread's place to another thread meanwhile.
            with long_wait():
                result = pull(max_wait_s=float(max_wait_s))
        if result.held:
            return request.reply({"version": result.version, "held": True})
        meta = {"version": result.version, "held": False}
        if result.durable is not None:
            meta["durable"] = result.durable
        if wants_changes:
            meta[GENERATION_KEY] = [self.shard.life, result.generation]
        if result.changes is not None:
            tensors = changes_tensors(
                result.changes, self.shard.slices, requested_dtype(request.meta)
            )
            self.service.count_bytes(0, sum(tensor.nbytes for _, tensor in tensors))
            return request.reply(meta | {SPARSE_KEY: True}, tensors)
        buffers.generation = result.generation
        if DTYPE_KEY not in request.meta:
            self.service.count_bytes(0, self._slice_bytes)
            return request.reply(meta, buffers.pull_tensors)
        narrowed = self._compressed_slices().pull_tensors(
            request.meta, buffers.pull_tensors, result.generation
        )
        self.service.count_bytes(0, sum(tensor.nbytes for _, tensor in narrowed))
        return request.reply(meta, narrowed)

    def _placed_buffers(self, offer: object) -> list[torch.Tensor]:
        """The views of the push buffers ``offer`` describes (mapped at the first push of this
        connection that names them: a reconnected client's pushes carry the offer again)."""
        if not isinstance(offer, dict):
            raise ValueError(f"{PLACED_KEY} must be a shared-memory offer, got {offer!r}")
        where = f"{offer.get('token')}:{offer.get('slices')}"
        views = self._placed.get(where)
        if views is None:
            # A refusal the client answers by sending the tensors: a placed push may reach a
            # shard that cannot map it when it is retried on the shard's next life.
            if transport_setting() == "tcp":
                raise PlacementRefusedError("this shard uses TCP only: push the gradient's tensors")
            pieces = [(piece.numel, piece.dtype) for piece in self.shard.slices]
            try:
                views = map_push_buffers(offer, pieces)
            except OSError as e:
                raise PlacementRefusedError(f"cannot map the client's push buffers: {e}") from None
            if len(self._placed) >= _MAX_PLACED_PER_CONNECTION:
                self._placed.clear()
            self._placed[where] = views
        return views

    def _share(self, request: Message) -> Message:
        """Offer the shared parameters (``wire/shared_params.py``) to a client on this host,
        and map its push buffers if it offers them; or say why not. A client on another host
        cannot open what is offered, and pulls instead (nor can this shard open its buffers)."""
        self._bind_group(request.meta)
        self._identify(request.meta)
        shared = (
            "this shard uses TCP only"
            if transport_setting() == "tcp"
            else self.shard.share_parameters()
        )
        meta: dict = {"shared": False, "placed": False}
        if PLACED_KEY in request.meta:
            try:
                self._placed_buffers(request.meta[PLACED_KEY])
                meta["placed"] = True
            except (ValueError, PlacementRefusedError) as e:
                meta["placed_why"] = str(e)
        if isinstance(shared, str):
            meta["why"] = shared
        else:
            meta |= {"shared": True, "version": self.shard.version, **shared.offer()}
        durable = self.shard.describe_durability()
        if durable is not None:
            meta["durable"] = durable
        return request.reply(meta)

    def _held_generation(self, meta: dict) -> int:
        """The generation of this shard's values a pull's ``SINCE_KEY`` says the puller holds
        (-1: none, or another life's, whose generations mean nothing here)."""
        since = meta[SINCE_KEY]
        if since is None:
            return -1
        if not isinstance(since, list) or len(since) != 2 or type(since[1]) is not int:
            raise ValueError(f"{SINCE_KEY} must be [life, generation] or null, got {since!r}")
        return since[1] if since[0] == self.shard.life and since[1] >= 0 else -1

    def _stats(self, request: Message) -> Message:
        """One group's counters when the request names it, else the sum over every group
        (the same as the default group's when the process serves no other)."""
        if "group" in request.meta:
            shard = self.service.groups.get(request.meta["group"])
            counters = shard.counters()
            figures = {
                "version": counters.version,
                "num_pushes": counters.num_pushes,
                "num_pulls": counters.num_pulls,
                "num_dropped": counters.num_dropped,
                "staleness": shard.staleness.as_dict(),
            }
        else:
            figures = self.service.groups.totals()
        return request.reply(
            {
                **self._describe(),
                **figures,
                "groups": sorted(self.service.groups.shards()),
                "rows": describe_tables(self.service.tables),
                "bytes_received": self.service.bytes_received,
                "bytes_sent": self.service.bytes_sent,
                "bytes_shared": self.service.bytes_shared,
            }
        )
