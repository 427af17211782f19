"""A worker's bounded cache of pulled rows: one table's rows by id, each with the step it was
pulled at, least recently used dropped first when the budget is full.

A cached row serves lookups until it is ``max_age_steps`` steps old (the worker's pull period:
rows are as fresh as the dense parameters), and the worker's own gradients are applied to it
meanwhile, as Downpour applies them to the dense parameters between pulls. Lookups and
insertions go through a dict id -> slot; the rows live in one preallocated tensor, so the
cache's memory is its budget, allocated once.
"""

from __future__ import annotations

import torch

_DICT_BYTES_PER_ROW = 120
"""About what a dict entry and its two int objects cost, counted against the budget."""


def cache_rows_for(budget_bytes: int, dim: int) -> int:
    """How many rows of ``dim`` float32 values fit in ``budget_bytes`` (slot, step, dict entry
    included)."""
    return max(0, budget_bytes // (dim * 4 + 16 + _DICT_BYTES_PER_ROW))


class RowCache:
    """Up to ``capacity`` rows of ``dim`` values.

    Args:
        dim: Values per row.
        capacity: Rows held at most (0: a cache that holds nothing).
        max_age_steps: A row pulled at step t serves lookups at steps < t + max_age_steps.
    """

    def __init__(self, dim: int, capacity: int, max_age_steps: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        if max_age_steps < 1:
            raise ValueError(f"max_age_steps must be >= 1, got {max_age_steps}")
        self.dim = dim
        self.capacity = capacity
        self.max_age_steps = max_age_steps
        self._slot_of: dict[int, int] = {}
        self._values = torch.zeros(capacity, dim)
        self._pulled_at = torch.zeros(capacity, dtype=torch.int64)
        self._used_at = torch.full((capacity,), -1, dtype=torch.int64)
        self._ids = torch.zeros(capacity, dtype=torch.int64)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def nbytes(self) -> int:
        """The tensors' bytes (allocated at construction)."""
        return sum(t.nbytes for t in (self._values, self._pulled_at, self._used_at, self._ids))

    def lookup(self, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fresh rows of ``ids`` that are cached [h, D], a mask of which ids they are)."""
        if not self._slot_of:
            self.misses += ids.numel()
            return torch.zeros(0, self.dim), torch.zeros(ids.numel(), dtype=torch.bool)
        get = self._slot_of.get
        slots = torch.tensor([get(i, -1) for i in ids.tolist()], dtype=torch.int64)
        held = slots >= 0
        fresh = held.clone()
        fresh[held] = self._pulled_at[slots[held]] > step - self.max_age_steps
        hit_slots = slots[fresh]
        self._used_at[hit_slots] = step
        self.hits += int(hit_slots.numel())
        self.misses += ids.numel() - int(hit_slots.numel())
        return self._values[hit_slots], fresh

    def insert(self, ids: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Caches freshly pulled ``rows`` of ``ids`` (unique) at ``step``, replacing what is
        held for them and, when full, the least recently used rows of earlier steps."""
        if not self.capacity or not ids.numel():
            return
        id_list = ids.tolist()
        get = self._slot_of.get
        slots = [get(i, -1) for i in id_list]
        new = [p for p, slot in enumerate(slots) if slot < 0]
        # Held rows refreshed by this insert are in use now: making room must not evict them
        # (a stale row is held but was not used by this step's lookup).
        self._used_at[torch.tensor([slot for slot in slots if slot >= 0], dtype=torch.int64)] = step
        if new:
            free = self._free_slots(len(new), step)
            for position, slot in zip(new, free, strict=False):
                slots[position] = slot
                self._slot_of[id_list[position]] = slot
            kept = [p for p, slot in enumerate(slots) if slot >= 0]
            if len(kept) < len(slots):  # more new rows than the cache holds: keep the first
                ids, rows = ids[kept], rows[kept]
                slots = [slots[p] for p in kept]
        slot_tensor = torch.tensor(slots, dtype=torch.int64)
        self._values[slot_tensor] = rows
        self._ids[slot_tensor] = ids
        self._pulled_at[slot_tensor] = step
        self._used_at[slot_tensor] = step

    def _free_slots(self, count: int, step: int) -> list[int]:
        """Up to ``count`` slots: never used ones first, then the least recently used rows'
        (not those used at ``step``, which the current batch holds)."""
        unused = (self._used_at < 0).nonzero().flatten()[:count].tolist()
        if len(unused) >= count:
            return unused
        candidates = ((self._used_at >= 0) & (self._used_at < step)).nonzero().flatten()
        order = torch.argsort(self._used_at[candidates], stable=True)
        victims = candidates[order[: count - len(unused)]]
        for row_id in self._ids[victims].tolist():
            del self._slot_of[row_id]
        self._used_at[victims] = -1
        return unused + victims.tolist()

    def apply(self, ids: torch.Tensor, delta: torch.Tensor) -> None:
        """Adds ``delta`` [n, D] to the cached rows of ``ids`` (the others are not held)."""
        if not self._slot_of:
            return
        get = self._slot_of.get
        slots = torch.tensor([get(i, -1) for i in ids.tolist()], dtype=torch.int64)
        held = slots >= 0
        self._values.index_add_(0, slots[held], delta[held])
