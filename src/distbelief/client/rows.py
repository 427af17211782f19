"""RowClient: pull and push embedding rows by id against every shard's tables.

A batch's ids are grouped by owner (``row_shard``) and each shard gets one request for every
table at once, on its lane (``lanes.py``), so a step costs one round trip per shard whatever the
number of tables. Only the ids asked for travel, and only their rows come back: bytes per
request are ids x 8 + rows x D x 4 plus framing, whatever the table's size. Pushes carry unique
ids (repeated ids' rows are summed here first, as torch sums a sparse gradient's repeated
indices) and a sequence number, so a retried push is applied once, and the step they end, so a
restarted worker sends no shard a step it holds.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import secrets
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from distbelief.client.lanes import ShardLanes
from distbelief.client.ps_client import check_shard_count
from distbelief.errors import ConsistencyMismatchError, ModelMismatchError, RemoteError
from distbelief.hosts import parse_addresses
from distbelief.sharding.rows import row_shard
from distbelief.wire import Message
from distbelief.wire.ops import PUSHED_STEP_KEY
from distbelief.wire.row_ops import MAX_PULL_ROWS_BYTES, PULL_ROWS, PUSH_ROWS, ROWS_HELLO
from distbelief.wire.security import WireSecurity

_ROW_SETTING_FIELDS = {
    "optimizer": "embeddings.row_optimizer",
    "lr": "embeddings.row_lr",
    "admit_after": "embeddings.admit_after",
    "max_rows": "embeddings.max_rows_per_shard",
    "ttl_steps": "embeddings.row_ttl_steps",
    "init_std": "embeddings.row_init_std",
    "seed": "model.seed",
}
"""A shard's row setting (``RowTableSettings``) -> the config field that sets it."""


class ShardPart(NamedTuple):
    """One shard's share of a request: its tables (in request order), how many ids each has
    there, those ids concatenated, and each table's positions of them in the caller's ids
    (None: the shard has them all, in order)."""

    names: list[str]
    counts: list[int]
    ids: torch.Tensor
    positions: list[torch.Tensor] | None
    flat_positions: torch.Tensor | None = None
    """Where each of ``ids`` is in every table's ids of the request, one table after the
    other (None with ``positions``): tables of one row width are gathered and scattered in
    one operation per shard, not one per table."""


class PendingRows:
    """A pull under way: ``result()`` waits for every shard's answer and puts the rows in the
    order the ids were given."""

    def __init__(self, client: RowClient, ids_by_table: dict, sent: list) -> None:
        self._client, self._ids_by_table, self._sent = client, ids_by_table, sent

    def result(self) -> dict[str, torch.Tensor]:
        """Each table's rows ``(*ids.shape, D)``, as ``nn.Embedding`` gives them.

        Raises:
            ShardTimeoutError / ShardUnavailableError / RemoteError: a shard did not answer.
        """
        client = self._client
        replies = client.wait([future for _, _, future in self._sent])
        scattered = any(part.positions is not None for _, part, _ in self._sent)
        width = client.common_width(self._ids_by_table)
        if scattered and width is not None:
            return self._scattered(replies, width)
        out: dict[str, torch.Tensor] = {}
        if scattered:
            out = {
                name: torch.empty(ids.numel(), client.tables[name])
                for name, ids in self._ids_by_table.items()
            }
        for (shard_id, part, _), reply in zip(self._sent, replies, strict=True):
            flat = reply.tensors[0][1] if reply.tensors else torch.zeros(0)
            dims = [client.tables[name] for name in part.names]
            sizes = [n * d for n, d in zip(part.counts, dims, strict=True)]
            if flat.numel() != sum(sizes):
                raise ModelMismatchError(f"shard {shard_id} answered {flat.numel()} values")
            for t, (name, chunk) in enumerate(zip(part.names, flat.split(sizes), strict=True)):
                rows = chunk.view(-1, dims[t])
                if part.positions is None:
                    out[name] = rows
                else:
                    out[name].index_copy_(0, part.positions[t], rows)
        for name, ids in self._ids_by_table.items():  # tables with no ids at all
            out.setdefault(name, torch.zeros(ids.numel(), client.tables[name]))
        return {
            name: out[name].view(*ids.shape, client.tables[name])
            for name, ids in self._ids_by_table.items()
        }

    def _scattered(self, replies: list, width: int) -> dict[str, torch.Tensor]:
        """``result()`` of tables that share one row width: every shard's rows put in place
        at once, then cut into the tables."""
        sizes = [ids.numel() for ids in self._ids_by_table.values()]
        rows = torch.empty(sum(sizes), width)
        for (shard_id, part, _), reply in zip(self._sent, replies, strict=True):
            flat = reply.tensors[0][1] if reply.tensors else torch.zeros(0)
            if flat.numel() != part.ids.numel() * width:
                raise ModelMismatchError(f"shard {shard_id} answered {flat.numel()} values")
            rows.index_copy_(0, part.flat_positions, flat.view(-1, width))
        return {
            name: table_rows.view(*ids.shape, width)
            for (name, ids), table_rows in zip(
                self._ids_by_table.items(), rows.split(sizes), strict=True
            )
        }


def coalesce_rows(ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct ids, ascending; each one's rows summed) of ``ids`` [n] and ``rows`` [n, D]: the
    sum a repeated index means in torch, whose ``nn.Embedding(sparse=True)`` gradients hold
    repeats that ``Tensor.coalesce()`` sums. Ids already ascending and distinct (as
    ``torch.unique`` returns them) are returned as given, after one comparison."""
    if ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids, rows
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    summed = torch.zeros(
        unique.numel(), rows.shape[1], dtype=torch.promote_types(rows.dtype, torch.float32)
    )
    return unique, summed.index_add_(0, inverse, rows.to(summed.dtype))


def split_for_pull(part: ShardPart, dims: Sequence[int], max_bytes: int) -> list[ShardPart]:
    """``part`` as requests of at most ``max_bytes`` of rows each (ids x width x 4), in
    order; a table's ids may continue into the next request. One request if it fits."""
    row_bytes = [dim * 4 for dim in dims]
    if max(row_bytes, default=0) > max_bytes:
        raise ValueError(f"a row of {max(row_bytes)} bytes does not fit {max_bytes} per request")
    if sum(count * size for count, size in zip(part.counts, row_bytes, strict=True)) <= max_bytes:
        return [part]
    positions = part.positions or [torch.arange(count) for count in part.counts]
    flat_positions = part.flat_positions
    if flat_positions is None:
        flat_positions = torch.arange(part.ids.numel())
    starts = list(itertools.accumulate(part.counts, initial=0))
    pieces: list[ShardPart] = []
    chunk: list[tuple[int, int, int]] = []  # (table, first, end) of the request being filled
    room = max_bytes
    for t, count in enumerate(part.counts):
        first = 0
        while first < count:
            take = min(count - first, room // row_bytes[t])
            if take == 0:  # this request is full (every row fits in an empty one)
                pieces.append(_chunk_part(part, positions, flat_positions, starts, chunk))
                chunk, room = [], max_bytes
                continue
            chunk.append((t, first, first + take))
            room -= take * row_bytes[t]
            first += take
    if chunk:
        pieces.append(_chunk_part(part, positions, flat_positions, starts, chunk))
    return pieces


def _chunk_part(
    part: ShardPart,
    positions: list[torch.Tensor],
    flat_positions: torch.Tensor,
    starts: list[int],
    chunk: list,
) -> ShardPart:
    def cut(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor[starts[t] + first : starts[t] + end] for t, first, end in chunk])

    return ShardPart(
        [part.names[t] for t, _, _ in chunk],
        [end - first for _, first, end in chunk],
        cut(part.ids),
        [positions[t][first:end] for t, first, end in chunk],
        cut(flat_positions),
    )


class RowClient(ShardLanes):
    """A worker's (or evaluator's) connections to the tables on every shard.

    Args:
        addresses: One address per shard, in shard-id order (the dense shards' addresses: a
            shard process serves both).
        tables: Table name -> row width, declared on every shard at :meth:`handshake`.
        sizes: Table name -> its number of rows (``num_embeddings``), declared with it: a
            shard refuses a table of another size than it holds (None: no size declared).
        timeout_s, connect_timeout_s, retry_timeout_s, security, source_host: as
            ``ShardLanes``.
        worker_id: This replica's name at the shards: their logs, and the step of its last push
            each remembers for its next life (``pushed_steps``).
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        tables: Mapping[str, int],
        *,
        sizes: Mapping[str, int] | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retry_timeout_s: float = 60.0,
        security: WireSecurity | None = None,
        worker_id: str | None = None,
        source_host: str | None = None,
    ) -> None:
        addresses = parse_addresses(addresses)
        if not isinstance(tables, Mapping):
            raise TypeError(f"tables must be a mapping of name -> row dimension, got {tables!r}")
        if not tables:
            raise ValueError("tables: give at least one table (name -> row dimension)")
        for name, dim in tables.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"tables: a table name must be a non-empty str, got {name!r}")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"tables: {name!r} needs a dimension >= 1, got {dim!r}")
        for name, size in (sizes or {}).items():
            if name not in tables or isinstance(size, bool) or not isinstance(size, int):
                raise ValueError(f"sizes: {name!r} needs a declared table and an int size")
            if size < 1:  # else refused by every shard, as a model mismatch
                raise ValueError(f"sizes: {name!r} needs a number of rows >= 1, got {size}")
        super().__init__(
            addresses,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            retry_timeout_s=retry_timeout_s,
            security=security,
            lane_name="rows-shard",
            source_host=source_host,
        )
        self.tables = dict(tables)
        self.sizes = dict(sizes or {})
        self.worker_id = worker_id
        self.settings: dict = {}
        """The shards' row settings (optimizer, admission, eviction), as they described them."""
        self.max_pull_bytes = MAX_PULL_ROWS_BYTES
        """The most bytes of rows one request asks a shard for: a larger pull is split."""
        self.pushed_steps: list[int | None] = [None] * self.num_shards
        """Per shard, as its handshake said: the step of the last push it applied from this
        worker id (an earlier life's, for a restarted worker); None: none."""
        self._push_seq = itertools.count(1)
        self._session = secrets.token_hex(8)

    def handshake(self) -> list[dict]:
        """Declares the tables on every shard; returns each shard's description.

        Raises:
            ShardListError: a shard is one of another number of shards, or listed out of
                order.
            ModelMismatchError: a shard holds a table of another width or size.
            ConsistencyMismatchError: the shards run different row settings.
        """
        meta = {"tables": self.tables, "sizes": self.sizes}
        if self.worker_id is not None:
            meta["worker"] = self.worker_id
        messages = [Message(ROWS_HELLO, {"shard_id": i, **meta}) for i in range(self.num_shards)]
        try:
            replies = [reply.meta for reply in self.request_each(messages)]
        except ModelMismatchError:  # ShardListError: out of order
            raise
        except RemoteError as e:  # a shard refused a table's width or size
            raise ModelMismatchError(str(e)) from e
        for shard_id, described in enumerate(replies):
            check_shard_count(self.addresses, shard_id, described)
            first, theirs = replies[0].get("settings") or {}, described.get("settings") or {}
            if theirs != first:
                # The first setting that differs, by the config field (and so the flag) that
                # sets it on a shard, as a consistency setting that differs is said.
                key = next(k for k in (*first, *theirs) if first.get(k) != theirs.get(k))
                raise ConsistencyMismatchError(
                    f"shard 0 ({self.addresses[0]}) runs {first.get(key)!r} but shard "
                    f"{shard_id} ({self.addresses[shard_id]}) runs {theirs.get(key)!r}",
                    field=_ROW_SETTING_FIELDS.get(key, f"row setting {key}"),
                )
        self.settings = dict(replies[0].get("settings", {}))
        self.pushed_steps = [reply.get(PUSHED_STEP_KEY) for reply in replies]
        return replies

    def _plan(
        self, ids_by_table: Mapping[str, torch.Tensor], *, every_shard: bool = False
    ) -> list[ShardPart | None]:
        """What each shard gets of ``ids_by_table`` (None: nothing; ``every_shard``: every
        table on every shard, with no ids where it owns none). One hash of all the ids at once,
        not one per table: a step's 26 tables cost the same few tensor ops as one."""
        names = list(ids_by_table)  # declared: checked by the callers
        ids_list = [ids_by_table[name].reshape(-1) for name in names]
        sizes = [ids.numel() for ids in ids_list]
        all_ids = torch.cat(ids_list) if ids_list else torch.zeros(0, dtype=torch.int64)
        if self.num_shards == 1:
            return [ShardPart(names, sizes, all_ids, None)] if names else [None]
        owners = row_shard(all_ids, self.num_shards)
        order = torch.sort(owners, stable=True).indices
        by_owner = torch.bincount(owners, minlength=self.num_shards).tolist()
        table_of = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
        offsets = torch.tensor([0, *itertools.accumulate(sizes)][:-1], dtype=torch.int64)
        plans: list[ShardPart | None] = []
        for positions in torch.split(order, by_owner):
            # Positions ascend within a shard, so its ids come grouped by table, in order.
            tables_here = table_of[positions]
            counts = torch.bincount(tables_here, minlength=len(names)).tolist()
            pieces = torch.split(positions - offsets[tables_here], counts)
            keep = [t for t, count in enumerate(counts) if count or every_shard]
            plans.append(
                ShardPart(
                    [names[t] for t in keep],
                    [counts[t] for t in keep],
                    all_ids[positions],
                    [pieces[t] for t in keep],
                    positions,
                )
                if keep
                else None
            )
        return plans

    def _send_each(
        self, parts: list[tuple[int, ShardPart]], make_message, *, now: bool
    ) -> list[tuple[int, ShardPart, cf.Future]]:
        """(shard id, part, future) of one request per part; with ``now`` the last runs on
        this thread, after the others are queued."""
        sent = []
        for position, (shard_id, part) in enumerate(parts):
            lane = self._lanes[shard_id]
            run = lane.run_now if now and position == len(parts) - 1 else lane.submit
            sent.append((shard_id, part, run(self._request, shard_id, make_message(part))))
        return sent

    def pull(self, ids_by_table: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows ``(*ids.shape, D)`` of each table's ids, of any shape, as ``nn.Embedding``
        gives them (ids without a row read as the shards' settings say), every shard asked at
        once; waits for the answers.

        Raises:
            ShardTimeoutError / ShardUnavailableError / RemoteError: a shard did not answer.
        """
        return self._start_pull(ids_by_table, now=True).result()

    def start_pull(self, ids_by_table: Mapping[str, torch.Tensor]) -> PendingRows:
        """:meth:`pull` without waiting: the requests go out now (after whatever this client
        sent before, shard by shard); ``result()`` waits for the rows."""
        return self._start_pull(ids_by_table, now=False)

    def common_width(self, tables: Mapping[str, object]) -> int | None:
        """The row width every one of ``tables`` (declared) has, None if they have several
        (or there are none)."""
        widths = {self.tables[name] for name in tables}
        return widths.pop() if len(widths) == 1 else None

    def _check_declared(self, name: object) -> None:
        if name not in self.tables:
            raise ValueError(f"table {name!r} was not declared (tables: {sorted(self.tables)})")

    def _check_in_range(self, name: str, ids: torch.Tensor) -> None:
        """Refuses an id outside a table of a declared size, as ``nn.Embedding`` refuses an
        index out of range: the shards would make a row for it and train it without a word."""
        size = self.sizes.get(name)
        if size is None or not ids.numel():
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            raise ValueError(
                f"table {name!r}: id {low if low < 0 else high} is out of range for its "
                f"{size} rows (ids must be in [0, {size}))"
            )

    def _check_pull(self, ids_by_table: object) -> None:
        """Refuses ids that are not an int64 tensor of a declared table, naming the table (a
        list failed on a missing method, int32 ids were refused by a shard or by the hash)."""
        if not isinstance(ids_by_table, Mapping):
            raise TypeError(f"ids_by_table must map table names to ids, got {ids_by_table!r}")
        for name, ids in ids_by_table.items():
            self._check_declared(name)
            if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
                got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise TypeError(f"table {name!r}: ids must be an int64 tensor, got {got}")
            self._check_in_range(name, ids)

    def _start_pull(self, ids_by_table, now: bool) -> PendingRows:
        self._check_pull(ids_by_table)
        parts = [
            (shard_id, piece)
            for shard_id, part in enumerate(self._plan(ids_by_table))
            if part is not None
            for piece in split_for_pull(
                part, [self.tables[name] for name in part.names], self.max_pull_bytes
            )
        ]

        def message(part: ShardPart) -> Message:
            meta = {"tables": part.names, "counts": part.counts}
            return Message(PULL_ROWS, meta, [("ids", part.ids)])

        return PendingRows(self, dict(ids_by_table), self._send_each(parts, message, now=now))

    def push(
        self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], step: int | None = None
    ) -> list[cf.Future]:
        """Sends each table's ids, of any shape, and gradient rows ``(*ids.shape, D)`` (the
        gradient of what :meth:`pull` returned for those ids) to their shards (one
        step of each table on every shard, rows there or not); the futures resolve when each
        shard has applied its part. A repeated id's rows are summed into one, as torch sums
        the repeated indices of a sparse gradient (``coalesce_rows``). ``step``: the worker's
        step the push ends, which the shards remember; a shard whose ``held_steps`` reach it
        is left out.

        Raises:
            TypeError / ValueError: an update is not (int64 ids, float rows
                ``(*ids.shape, D)``) of a declared table; nothing is sent.
        """
        return self._push(updates, step, now=False)

    def push_now(
        self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], step: int | None = None
    ) -> None:
        """:meth:`push` and wait until every shard has applied it."""
        self.wait(self._push(updates, step, now=True))

    def _check_updates(self, updates: object) -> None:
        """Refuses an update that is not (ids, gradient rows ``(*ids.shape, D)``) of a declared
        table: with several shards, each takes the rows of its own ids, so a row too many or
        too few would be dropped or misread without a word."""
        if not isinstance(updates, Mapping):
            raise TypeError(f"updates must map table names to (ids, rows), got {updates!r}")
        for name, update in updates.items():
            self._check_declared(name)
            if not isinstance(update, tuple | list) or len(update) != 2:
                raise TypeError(f"table {name!r}: an update must be (ids, rows), got {update!r}")
            ids, rows = update
            if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
                got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise TypeError(f"table {name!r}: ids must be an int64 tensor, got {got}")
            self._check_in_range(name, ids)
            expected = (*ids.shape, self.tables[name])
            if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
                got = rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__
                raise TypeError(f"table {name!r}: rows must be a float tensor, got {got}")
            if tuple(rows.shape) != expected:
                raise ValueError(
                    f"table {name!r}: rows must be {list(expected)} (one row of "
                    f"{expected[-1]} values per id of ids {list(ids.shape)}), "
                    f"got {list(rows.shape)}"
                )

    def _push(self, updates, step: int | None, now: bool) -> list:
        self._check_updates(updates)
        # A shard steps each row once per push: repeats are summed first (its optimizer's
        # state, Adagrad's say, would see one gradient where torch sees their sum).
        updates = {
            name: coalesce_rows(ids.reshape(-1), rows.reshape(-1, self.tables[name]))
            for name, (ids, rows) in updates.items()
        }
        # Every shard steps every table pushed, rows there or not, so that a table's step
        # count (Adam's bias correction, the time to live) is the same on every shard.
        plans = self._plan({name: ids for name, (ids, _) in updates.items()}, every_shard=True)
        seq = next(self._push_seq)
        together = None  # every table's rows, one after the other, when they share a width
        if self.num_shards > 1 and self.common_width(updates) is not None:
            together = torch.cat([rows for _, rows in updates.values()])

        def message(part: ShardPart) -> Message:
            if part.positions is None:
                grads = [updates[name][1].reshape(-1) for name in part.names]
            elif together is not None:
                grads = [together.index_select(0, part.flat_positions).reshape(-1)]
            else:
                grads = [
                    updates[name][1].index_select(0, positions).reshape(-1)
                    for name, positions in zip(part.names, part.positions, strict=True)
                ]
            meta = {
                "tables": part.names,
                "counts": part.counts,
                "seq": seq,
                "session": self._session,
            }
            if self.worker_id is not None:
                meta["worker"] = self.worker_id
            if step is not None:
                meta["clock"] = step
            flat = torch.cat(grads).float() if grads else torch.zeros(0)
            return Message(PUSH_ROWS, meta, [("ids", part.ids), ("grads", flat)])

        parts = [
            (shard_id, part)
            for shard_id, part in enumerate(plans)
            if part is not None and not self.holds(shard_id, step)
        ]
        return [future for _, _, future in self._send_each(parts, message, now=now)]

    def stats(self) -> list[dict]:
        """Each shard's tables: settings and per-table counters (rows, admitted, evicted,
        pending, steps), and the rows pulled and pushed so far."""
        messages = [Message(ROWS_HELLO, {"shard_id": i}) for i in range(self.num_shards)]
        return [reply.meta for reply in self.request_each(messages)]
