"""RowClient: pull and push embedding rows by id against every shard's tables.

A batch's ids are grouped by owner (``row_shard``) and each shard gets one request for every
table at once, on its lane (``lanes.py``), so a step costs one round trip per shard whatever the
number of tables. Only the ids asked for travel, and only their rows come back: bytes per
request are ids x 8 + rows x D x 4 plus framing, whatever the table's size. Pushes carry unique
ids (the caller sums repeated ids' gradients) and a sequence number, so a retried push is
applied once.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import secrets
from collections.abc import Mapping, Sequence

import torch

from distbelief.client.lanes import ShardLanes
from distbelief.errors import ConsistencyMismatchError, ModelMismatchError, RemoteError
from distbelief.sharding.rows import split_by_shard
from distbelief.wire import Message
from distbelief.wire.row_ops import PULL_ROWS, PUSH_ROWS, ROWS_HELLO
from distbelief.wire.security import WireSecurity


class RowClient(ShardLanes):
    """A worker's (or evaluator's) connections to the tables on every shard.

    Args:
        addresses: One address per shard, in shard-id order (the dense shards' addresses: a
            shard process serves both).
        tables: Table name -> row width, declared on every shard at :meth:`handshake`.
        timeout_s, connect_timeout_s, retry_timeout_s, security: as ``ShardLanes``.
        worker_id: This replica's name at the shards (logs only).
    """

    def __init__(
        self,
        addresses: Sequence[str],
        tables: Mapping[str, int],
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retry_timeout_s: float = 60.0,
        security: WireSecurity | None = None,
        worker_id: str | None = None,
    ) -> None:
        super().__init__(
            addresses,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            retry_timeout_s=retry_timeout_s,
            security=security,
            lane_name="rows-shard",
        )
        self.tables = dict(tables)
        self.worker_id = worker_id
        self.settings: dict = {}
        """The shards' row settings (optimizer, admission, eviction), as they described them."""
        self._push_seq = itertools.count(1)
        self._session = secrets.token_hex(8)

    def handshake(self) -> list[dict]:
        """Declares the tables on every shard; returns each shard's description.

        Raises:
            ModelMismatchError: a shard is one of another number of shards, is listed out of
                order, or holds a table of another width.
            ConsistencyMismatchError: the shards run different row settings.
        """
        messages = [
            Message(ROWS_HELLO, {"shard_id": i, "tables": dict(self.tables)})
            for i in range(self.num_shards)
        ]
        try:
            replies = [reply.meta for reply in self.request_each(messages)]
        except RemoteError as e:  # a shard refused a table's width or its place in the list
            raise ModelMismatchError(str(e)) from e
        for shard_id, described in enumerate(replies):
            if described.get("num_shards") != self.num_shards:
                raise ModelMismatchError(
                    f"shard {shard_id} ({self.addresses[shard_id]}) is one of "
                    f"{described.get('num_shards')} shards, but {self.num_shards} were given"
                )
            if described.get("settings") != replies[0].get("settings"):
                raise ConsistencyMismatchError(
                    f"shard 0 ({self.addresses[0]}) and shard {shard_id} "
                    f"({self.addresses[shard_id]}) run different row settings: "
                    f"{replies[0].get('settings')} vs {described.get('settings')}"
                )
        self.settings = dict(replies[0].get("settings", {}))
        return replies

    def _by_shard(
        self, ids_by_table: Mapping[str, torch.Tensor], *, every_shard: bool = False
    ) -> list[list[tuple]]:
        """``[shard] -> [(table, positions, ids)]`` for the tables with ids on that shard
        (``every_shard``: every table on every shard, empty where it has no ids)."""
        per_shard: list[list[tuple]] = [[] for _ in range(self.num_shards)]
        for name, ids in ids_by_table.items():
            if name not in self.tables:
                raise ValueError(f"table {name!r} was not declared (tables: {sorted(self.tables)})")
            for shard_id, (positions, owned) in enumerate(split_by_shard(ids, self.num_shards)):
                if owned.numel() or every_shard:
                    per_shard[shard_id].append((name, positions, owned))
        return per_shard

    def pull(self, ids_by_table: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows ``[n, D]`` of each table's ids ``[n]`` (ids without a row read as zeros),
        every shard asked at once; waits for the answers.

        Raises:
            ShardTimeoutError / ShardUnavailableError / RemoteError: a shard did not answer.
        """
        out = {
            name: torch.empty(ids.numel(), self.tables[name]) for name, ids in ids_by_table.items()
        }
        per_shard = self._by_shard(ids_by_table)
        asked = [shard_id for shard_id, parts in enumerate(per_shard) if parts]
        futures = []
        for position, shard_id in enumerate(asked):
            message = Message(
                PULL_ROWS,
                {"tables": [name for name, _, _ in per_shard[shard_id]]},
                [(name, ids) for name, _, ids in per_shard[shard_id]],
            )
            lane = self._lanes[shard_id]
            # The last shard's request runs on this thread, after the others are queued.
            run = lane.run_now if position == len(asked) - 1 else lane.submit
            futures.append(run(self._request, shard_id, message))
        for shard_id, reply in zip(asked, self.wait(futures), strict=True):
            parts = per_shard[shard_id]
            if [name for name, _ in reply.tensors] != [name for name, _, _ in parts]:
                raise ModelMismatchError(
                    f"shard {shard_id} answered tables {[n for n, _ in reply.tensors]}"
                )
            for (name, positions, _), (_, rows) in zip(parts, reply.tensors, strict=True):
                out[name].index_copy_(0, positions, rows)
        return out

    def push(self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[cf.Future]:
        """Sends each table's unique ids ``[n]`` and summed gradient rows ``[n, D]`` to their
        shards (one step of each table on every shard, rows there or not); the futures
        resolve when each shard has applied its part. The tensors are sent
        as they are: do not change them until the futures are done."""
        return self._push(updates, now=False)

    def push_now(self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """:meth:`push` and wait until every shard has applied it."""
        self.wait(self._push(updates, now=True))

    def _push(self, updates, now: bool) -> list:
        # Every shard steps every table pushed, rows there or not, so that a table's step
        # count (Adam's bias correction, the time to live) is the same on every shard.
        per_shard = self._by_shard(
            {name: ids for name, (ids, _) in updates.items()}, every_shard=True
        )
        seq = next(self._push_seq)
        asked = [shard_id for shard_id, parts in enumerate(per_shard) if parts]
        futures = []
        for position, shard_id in enumerate(asked):
            tensors = []
            for name, positions, ids in per_shard[shard_id]:
                grads = updates[name][1]
                tensors += [(name, ids), (name, grads.index_select(0, positions))]
            meta = {
                "tables": [name for name, _, _ in per_shard[shard_id]],
                "seq": seq,
                "session": self._session,
            }
            if self.worker_id is not None:
                meta["worker"] = self.worker_id
            lane = self._lanes[shard_id]
            message = Message(PUSH_ROWS, meta, tensors)
            run = lane.run_now if now and position == len(asked) - 1 else lane.submit
            futures.append(run(self._request, shard_id, message))
        return futures

    def stats(self) -> list[dict]:
        """Each shard's tables: settings and per-table counters (rows, admitted, evicted,
        pending, steps), and the rows pulled and pushed so far."""
        messages = [Message(ROWS_HELLO, {"shard_id": i}) for i in range(self.num_shards)]
        return [reply.meta for reply in self.request_each(messages)]
