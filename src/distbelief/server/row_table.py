"""The row table: the embedding rows a shard owns, their optimizer state, admission and eviction.

Rows live in slots of preallocated tensors (values [capacity, D], each optimizer state
[capacity, *shape], and per slot its id and the table step that last touched it). A sorted
index maps id -> slot (``row_index.py``: 16 bytes per row, looked up a batch at a time), on top
of the tensors' ``(D + state floats) * 4 + 16`` bytes per slot. Capacity grows by doubling,
rounded up to whole chunks of ``chunk_rows`` slots (fewer where they would pass
``GROWTH_CHUNK_BYTES``: wide rows), so n rows cost O(log n) reallocations, never one per row;
evicted slots go on a free stack and are reused before the table grows.

Admission counts pushes only: a pull is read-only (evaluation pulls too, and a training step
pulls and then pushes the same ids, so counting both would count each step twice). An id's
``admit_after``-th push creates its row and applies that push's gradient to it; until then it
reads as zeros. The counts of ids awaiting admission are bounded as the rows are: by
``max_rows`` ids (least recently pushed forgotten first) and by the time to live, so a long tail
of ids seen once or twice does not grow a shard's memory for ever. A forgotten id starts
counting again. With ``admit_after`` 1 an id without a row reads as its initial row, which
depends on the id alone, so the table behaves as one that holds every id's row.

Recency, for LRU eviction and the time to live, is also the last push that
touched a row. Table steps count pushes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch

from distbelief.server.row_index import RowIndex
from distbelief.server.row_optimizers import RowOptimizer, flag_name_of
from distbelief.sharding.rows import mix64

RowInit = Callable[[torch.Tensor], torch.Tensor]

_FREE = -1  # last_step of a slot holding no row

GROWTH_CHUNK_BYTES = 1 << 20
"""Most bytes a chunk of slots takes: 1024 rows of 16 floats are 64 KiB with no state, but
1024 rows of 65536 floats would be 256 MiB for a table that holds three (a chunk of them is
3 rows, 1 with Adagrad's state)."""


def _check_ids(ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError("row ids must be a 1-D int64 tensor")


def recency_order(ids: torch.Tensor, last_steps: torch.Tensor) -> torch.Tensor:
    """The positions of ``ids`` least recently pushed first (by ``last_steps``), ties by id: an
    order that does not depend on where rows happen to sit, so a reloaded or resharded table
    evicts exactly as the saved one would."""
    order = torch.sort(ids, stable=True).indices
    return order[torch.sort(last_steps[order], stable=True).indices]


def seeded_normal_rows(ids: torch.Tensor, dim: int, std: float, seed: int) -> torch.Tensor:
    """Normal(0, std) rows that depend only on (id, column, seed), not on arrival order or
    machine: a splitmix64 stream per id feeds a Box-Muller transform (float64, then float32)."""
    base = mix64(mix64(ids) ^ seed)[:, None] + 2 * torch.arange(dim, dtype=torch.int64)
    # The top 53 bits of each mix are a uniform double; u1 in (0, 1] keeps log finite.
    scale = 2.0**-53
    u1 = ((mix64(base) >> 11) & ((1 << 53) - 1)).double().add_(1).mul_(scale)
    u2 = ((mix64(base + 1) >> 11) & ((1 << 53) - 1)).double().mul_(scale)
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (normal * std).float()


class RowTable:
    """The rows of the ids one shard owns, updated by a row optimizer.

    Args:
        dim: Values per row (D).
        optimizer: Applies pushed gradients; its per-row state is kept here.
        admit_after: Pushes of an id before it gets a row (1: on its first push).
        max_rows: Most rows held; when a push needs room, least-recently-pushed rows go
            first (ties: lower id first). Also the most ids awaiting admission whose counts are
            kept (least recently pushed forgotten first). None: unbounded.
        ttl_steps: Rows, and counts of ids awaiting admission, not pushed in the last
            ``ttl_steps`` table steps are dropped at the end of a push. None: never.
        init: "zeros", "normal" (seeded by id: reproducible whatever the order ids arrive
            in), or a function from new ids [n] to their rows [n, D].
        init_std: The standard deviation of "normal".
        seed: The seed of "normal".
        chunk_rows: Slots are allocated in whole chunks of this many, or of fewer where this
            many would take more than ``GROWTH_CHUNK_BYTES`` (wide rows).

    Attributes:
        num_admitted: Rows ever created (an evicted id that comes back counts again).
        num_evicted: Rows dropped by LRU or the time to live.
        num_steps: Pushes so far (the step the row optimizers see).
    """

    def __init__(
        self,
        dim: int,
        optimizer: RowOptimizer,
        *,
        admit_after: int = 1,
        max_rows: int | None = None,
        ttl_steps: int | None = None,
        init: str | RowInit = "zeros",
        init_std: float = 0.01,
        seed: int = 0,
        chunk_rows: int = 1024,
    ) -> None:
        if dim < 1:
            raise ValueError(f"row table dim must be >= 1, got {dim}")
        if admit_after < 1:
            raise ValueError(f"admit_after must be >= 1, got {admit_after}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        if ttl_steps is not None and ttl_steps < 1:
            raise ValueError(f"ttl_steps must be >= 1 or None, got {ttl_steps}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        if not callable(init) and init not in ("zeros", "normal"):
            raise ValueError(f"row init must be 'zeros', 'normal' or a function, got {init!r}")
        self.dim = dim
        self.optimizer = optimizer
        self.admit_after = admit_after
        self.max_rows = max_rows
        self.ttl_steps = ttl_steps
        self.init = init
        self.init_std = init_std
        self.seed = seed
        self.chunk_rows = chunk_rows
        self._state_shapes = optimizer.state_shapes(dim)
        # Values and state as float32, the id and last step as int64.
        slot_bytes = 4 * (dim + sum(math.prod(s) for s in self._state_shapes.values())) + 16
        self._growth_rows = max(1, min(chunk_rows, GROWTH_CHUNK_BYTES // slot_bytes))
        self._reset(capacity=0)

    def _reset(self, capacity: int) -> None:
        self._index = RowIndex()
        # An evicted row's index entry stays until the next rebuild; until one is left, every
        # entry the index finds is a live row and the slot check of _slots can be skipped.
        self._stale_entries = False
        self._num_rows = 0
        # id -> (pushes counted, table step of the last), least recently pushed first (ties by
        # id, as a reloaded table orders them).
        self._pending: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._free = torch.zeros(0, dtype=torch.int64)  # a stack of evicted slots
        self._num_used_slots = 0  # slots [0, this) have held a row; the rest never have
        self._capacity = 0
        self._values = torch.zeros(0, self.dim)
        self._state = {name: torch.zeros(0, *shape) for name, shape in self._state_shapes.items()}
        self._slot_ids = torch.zeros(0, dtype=torch.int64)
        self._last_step = torch.zeros(0, dtype=torch.int64)
        self.num_admitted = 0
        self.num_evicted = 0
        self.num_steps = 0
        self._grow(capacity)

    @property
    def num_rows(self) -> int:
        """Rows held now."""
        return self._num_rows

    @property
    def num_pending(self) -> int:
        """Ids pushed but not yet admitted."""
        return len(self._pending)

    @property
    def capacity(self) -> int:
        """Slots allocated (rows held plus free slots plus the not yet used rest)."""
        return self._capacity

    def __contains__(self, row_id: int) -> bool:
        return bool(self._slots(torch.tensor([row_id], dtype=torch.int64))[0] >= 0)

    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        """The slot of each id's row, -1 where it has none (the index's answer, checked: the
        slot still holds that id and is in use)."""
        if not len(self._index):
            return torch.full((ids.numel(),), -1, dtype=torch.int64)
        slots, _ = self._index.find(ids)
        if not self._stale_entries:
            return slots
        candidates = slots.clamp(min=0)
        live = (slots >= 0) & (self._slot_ids[candidates] == ids)
        live &= self._last_step[candidates] != _FREE
        return torch.where(live, slots, -1)

    def pull(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids`` [n, D]. An id without a row (unknown or evicted) reads as the
        row its next push would create when ``admit_after`` is 1 (so a forward pass sees the
        values its gradient is then applied to, as with a table that holds every row), and as
        zeros while it awaits admission. Read-only: changes no count, recency or state."""
        _check_ids(ids)
        slots = self._slots(ids)
        held = slots >= 0
        if bool(held.all()):  # the common case, in one gather
            return self._values.index_select(0, slots)
        if self.admit_after == 1 and self.init != "zeros":
            rows = torch.empty(ids.numel(), self.dim)
            rows[~held] = self._initial_rows(ids[~held])
        else:
            rows = torch.zeros(ids.numel(), self.dim)
        rows[held] = self._values[slots[held]]
        return rows

    def push(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """One table step: counts ``ids`` toward admission, creates the rows of ids that reach
        ``admit_after``, applies ``grads`` to every id with a row, then expires stale rows.

        Args:
            ids: Unique ids [n] (a worker sums the gradients of repeated ids first).
            grads: Their gradient rows [n, D].

        Raises:
            ValueError: ids not a 1-D int64 tensor or not unique, or grads not [n, D].
        """
        _check_ids(ids)
        if grads.shape != (ids.numel(), self.dim):
            raise ValueError(
                f"row grads must be [{ids.numel()}, {self.dim}], got {list(grads.shape)}"
            )
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("pushed row ids must be unique (sum the rows of repeated ids)")
        self.apply_checked(ids, grads)

    def apply_checked(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """:meth:`push` of ids and grads already checked (unique int64 ids, [n, D] float32)."""
        self.num_steps += 1
        step = self.num_steps
        slots = self._slots(ids)
        held = slots >= 0
        if bool(held.all()):  # the common case: every id has its row
            self._last_step.index_fill_(0, slots, step)
            self._update(slots, grads, step)
        else:
            self._update(*self._hits_and_admitted(ids, grads, slots, held, step), step)
        if self.ttl_steps is not None:
            used = self._last_step[: self._num_used_slots]
            stale = (used != _FREE) & (used <= step - self.ttl_steps)
            self._evict(stale.nonzero().flatten())
        self._forget_pending(step)

    def _update(self, slots: torch.Tensor, grads: torch.Tensor, step: int) -> None:
        """The row optimizer's step on the rows in ``slots`` with their gradient rows."""
        if not slots.numel():
            return
        values = self._values.index_select(0, slots)
        state = {name: t.index_select(0, slots) for name, t in self._state.items()}
        self.optimizer.apply(values, state, grads.float(), step)
        self._values.index_copy_(0, slots, values)
        for name, tensor in state.items():
            self._state[name].index_copy_(0, slots, tensor)

    def _hits_and_admitted(self, ids, grads, slots, held, step: int) -> tuple:
        """(slots, gradient rows) of the ids with a row and of those admitted now."""
        hit_positions = held.nonzero().flatten()
        hit_slots = slots[hit_positions]
        # Touch the hits first so that making room never evicts a row this push updates.
        self._last_step[hit_slots] = step
        new_positions = self._due_for_admission(ids, (~held).nonzero().flatten(), step)
        new_slots = self._admit(ids[new_positions], step)
        if new_slots.numel() < new_positions.numel():
            # No room left: these stay one push short of admission and retry next time.
            short = ids[new_positions[new_slots.numel() :]].tolist()
            self._count_pending({row_id: self.admit_after - 1 for row_id in short}, step)
            new_positions = new_positions[: new_slots.numel()]

        positions = torch.cat([hit_positions, new_positions])
        return torch.cat([hit_slots, new_slots]), grads.index_select(0, positions)

    def _due_for_admission(
        self, ids: torch.Tensor, missing: torch.Tensor, step: int
    ) -> torch.Tensor:
        """The positions among ``missing`` (positions of ids without a row) whose push this is
        the ``admit_after``-th; the others' counts go up."""
        if self.admit_after == 1 or not missing.numel():
            return missing
        due, counted = [], {}
        for position, row_id in zip(missing.tolist(), ids[missing].tolist(), strict=True):
            count = self._pending.pop(row_id, (0, 0))[0] + 1
            if count >= self.admit_after:
                due.append(position)
            else:
                counted[row_id] = count
        self._count_pending(counted, step)
        return torch.tensor(due, dtype=torch.int64)

    def _count_pending(self, counts: dict[int, int], step: int) -> None:
        """Sets the pending counts of ids pushed at ``step``, as the most recently pushed (in
        id order, the order a reloaded table gives ids of one step)."""
        for row_id in sorted(counts):
            self._pending.pop(row_id, None)
            self._pending[row_id] = (counts[row_id], step)

    def _forget_pending(self, step: int) -> None:
        """Drops the counts of ids awaiting admission past the time to live or beyond
        ``max_rows``, least recently pushed first."""
        pending = self._pending
        if self.ttl_steps is not None:
            while pending and next(iter(pending.values()))[1] <= step - self.ttl_steps:
                pending.popitem(last=False)
        if self.max_rows is not None:
            while len(pending) > self.max_rows:
                pending.popitem(last=False)

    def _admit(self, new_ids: torch.Tensor, step: int) -> torch.Tensor:
        """Slots for ``new_ids`` with fresh rows; fewer than asked if max_rows leaves no room."""
        if not new_ids.numel():
            return torch.zeros(0, dtype=torch.int64)
        if self.max_rows is not None:
            over = self.num_rows + new_ids.numel() - self.max_rows
            if over > 0:
                self._evict(self._least_recent(over, step))
            new_ids = new_ids[: max(0, self.max_rows - self.num_rows)]
        num_reused = min(new_ids.numel(), self._free.numel())
        num_fresh = new_ids.numel() - num_reused
        self._grow(self._num_used_slots + num_fresh)
        reused = self._free[self._free.numel() - num_reused :].flip(0)
        self._free = self._free[: self._free.numel() - num_reused]
        fresh = torch.arange(self._num_used_slots, self._num_used_slots + num_fresh)
        self._num_used_slots += num_fresh
        slots = torch.cat([reused, fresh])
        self._values[slots] = self._initial_rows(new_ids)
        for name, tensor in self._state.items():
            tensor[slots] = self.optimizer.initial_state(name)
        self._slot_ids[slots] = new_ids
        self._last_step[slots] = step
        self._index.set(new_ids, slots)
        self._num_rows += new_ids.numel()
        self.num_admitted += new_ids.numel()
        if self._index.needs_rebuild():
            live = (self._last_step[: self._num_used_slots] != _FREE).nonzero().flatten()
            self._index.rebuild(self._slot_ids[live], live)
            self._stale_entries = False
        return slots

    def _initial_rows(self, ids: torch.Tensor) -> torch.Tensor:
        if callable(self.init):
            rows = self.init(ids)
            if rows.shape != (ids.numel(), self.dim):
                raise ValueError(
                    f"row init must return [{ids.numel()}, {self.dim}], got {list(rows.shape)}"
                )
            return rows
        if self.init == "normal":
            return seeded_normal_rows(ids, self.dim, self.init_std, self.seed)
        return torch.zeros(ids.numel(), self.dim)

    def _least_recent(self, count: int, step: int) -> torch.Tensor:
        """Up to ``count`` held slots not touched this step, least recently pushed first."""
        used = self._last_step[: self._num_used_slots]
        candidates = ((used != _FREE) & (used < step)).nonzero().flatten()
        return self._by_recency(candidates)[:count]

    def _by_recency(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots`` least recently pushed first, ties by id (``recency_order``)."""
        return slots[recency_order(self._slot_ids[slots], self._last_step[slots])]

    def _evict(self, slots: torch.Tensor) -> None:
        # The index keeps the evicted ids' entries; _slots sees they no longer hold a row.
        if not slots.numel():
            return
        self._last_step[slots] = _FREE
        self._stale_entries = True
        self._free = torch.cat([self._free, slots])
        self._num_rows -= slots.numel()
        self.num_evicted += slots.numel()

    def _grow(self, num_slots: int) -> None:
        """Makes room for ``num_slots`` slots: doubling, in whole chunks, capped at max_rows."""
        if num_slots <= self._capacity:
            return
        capacity = max(num_slots, 2 * self._capacity)
        capacity = -(-capacity // self._growth_rows) * self._growth_rows
        if self.max_rows is not None:
            # Slots in use never outnumber max_rows: evicted slots are reused first.
            capacity = max(num_slots, min(capacity, self.max_rows))
        extra = capacity - self._capacity

        def extend(tensor: torch.Tensor, fill: float) -> torch.Tensor:
            tail = torch.full((extra, *tensor.shape[1:]), fill, dtype=tensor.dtype)
            return torch.cat([tensor, tail])

        self._values = extend(self._values, 0.0)
        self._state = {name: extend(t, 0.0) for name, t in self._state.items()}
        self._slot_ids = extend(self._slot_ids, 0)
        self._last_step = extend(self._last_step, _FREE)
        self._capacity = capacity

    def state_dict(self) -> dict:
        """The held rows (least recently pushed first, ties by id), their optimizer state, the
        pending admission counts (by id) with the step of each id's last push, and the
        counters: tensors and plain values, copies."""
        used = self._last_step[: self._num_used_slots]
        slots = self._by_recency((used != _FREE).nonzero().flatten())
        pending_ids = sorted(self._pending)
        return {
            "dim": self.dim,
            "optimizer": self.optimizer.name,
            "ids": self._slot_ids[slots].clone(),
            "values": self._values[slots].clone(),
            "state": {name: t[slots].clone() for name, t in self._state.items()},
            "last_step": self._last_step[slots].clone(),
            "pending_ids": torch.tensor(pending_ids, dtype=torch.int64),
            "pending_counts": torch.tensor(
                [self._pending[i][0] for i in pending_ids], dtype=torch.int64
            ),
            "pending_last_step": torch.tensor(
                [self._pending[i][1] for i in pending_ids], dtype=torch.int64
            ),
            "num_steps": self.num_steps,
            "num_admitted": self.num_admitted,
            "num_evicted": self.num_evicted,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Replaces the table's rows, state and counters with a ``state_dict()``'s, held to
        ``max_rows`` at once: rows and ids awaiting admission past it (more than one shard's,
        after a reshard onto fewer) are evicted and forgotten as a push would, least recently
        pushed first, ties by id.

        Raises:
            ValueError: another dim or row optimizer, or state tensors not matching the ids.
        """
        if state_dict["dim"] != self.dim:
            raise ValueError(f"row table checkpoint has dim {state_dict['dim']}, not {self.dim}")
        if state_dict["optimizer"] != self.optimizer.name:
            # Named as the user gives them: the stored names are not all the flag's values.
            raise ValueError(
                "row table checkpoint is for --row-optimizer "
                f"{flag_name_of(state_dict['optimizer'])}, not {self.optimizer.flag_name}"
            )
        if state_dict["state"].keys() != self._state_shapes.keys():
            raise ValueError(f"row table checkpoint state has {sorted(state_dict['state'])}")
        if state_dict["values"].shape != (state_dict["ids"].numel(), self.dim):
            raise ValueError("row table checkpoint values do not match its ids")
        kept = self._kept_on_load(state_dict["ids"], state_dict["last_step"])
        ids = state_dict["ids"][kept]
        num_rows = ids.numel()
        self._reset(capacity=num_rows)
        self._num_used_slots = num_rows
        self._values[:num_rows] = state_dict["values"][kept]
        for name, tensor in state_dict["state"].items():
            self._state[name][:num_rows] = tensor[kept]
        self._slot_ids[:num_rows] = ids
        self._last_step[:num_rows] = state_dict["last_step"][kept]
        self._index.rebuild(ids.clone(), torch.arange(num_rows))
        self._num_rows = num_rows
        pending = sorted(
            zip(
                state_dict["pending_last_step"].tolist(),
                state_dict["pending_ids"].tolist(),
                state_dict["pending_counts"].tolist(),
                strict=True,
            )
        )
        self._pending = OrderedDict((i, (count, step)) for step, i, count in pending)
        self.num_steps = int(state_dict["num_steps"])
        self.num_admitted = int(state_dict["num_admitted"])
        self.num_evicted = int(state_dict["num_evicted"]) + state_dict["ids"].numel() - num_rows
        # What the end of the last push would have forgotten had it held these ids.
        self._forget_pending(self.num_steps)

    def _kept_on_load(self, ids: torch.Tensor, last_steps: torch.Tensor) -> torch.Tensor:
        """The positions of the saved rows a load keeps: all of them, or, beyond ``max_rows``
        (rows resharded onto fewer shards), the most recently pushed, as eviction would have
        left them. Cut here, not at the next push: the bound holds from the start, and only
        kept rows are allocated."""
        if self.max_rows is None or ids.numel() <= self.max_rows:
            return torch.arange(ids.numel())
        return recency_order(ids, last_steps)[ids.numel() - self.max_rows :]
