"""RowIndex: a row table's id -> slot map, looked up for a whole batch of ids in a few tensor ops.

Two sorted levels, as in a log-structured merge: a large ``main`` level and a small ``recent``
one that new entries are sorted into. A lookup is one ``searchsorted`` per level; an insert
re-sorts only the recent level; when the recent level outgrows an eighth of the main one, the
owner rebuilds the index from what it holds (an O(n log n) sort every n/8 inserts: O(log n) per
insert, amortised). A Python dict costs a hash and two int objects per id per lookup, which on
a step of a few thousand ids was most of a shard's time.

Entries are not removed when their row goes: the owner checks each slot it gets back (the id
stored in the slot, the slot still in use), and a rebuild keeps only live rows.
"""

from __future__ import annotations

import torch

MIN_RECENT_BEFORE_REBUILD = 4096
"""A rebuild is only worth it once the recent level has at least this many entries."""


def _empty() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


class RowIndex:
    """Ids -> slots, both int64 tensors."""

    def __init__(self) -> None:
        self._main = _empty()
        self._recent = _empty()

    def __len__(self) -> int:
        """Entries held, stale ones included."""
        return self._main[0].numel() + self._recent[0].numel()

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """(the slot of each id, -1 where it has no entry; each level's (hit mask, positions),
        None for an empty level).

        A slot may be stale (its row evicted or the slot reused): the caller checks it."""
        slots = None
        places: list[tuple] = []
        for keys, values in (self._main, self._recent):
            if not keys.numel():
                places.append((None, None))
                continue
            positions = torch.searchsorted(keys, ids).clamp_(max=keys.numel() - 1)
            # index_select, not keys[positions]: a lookup per table per request, where
            # indexing's argument parsing costs as much as the gather.
            hit = keys.index_select(0, positions) == ids
            found = torch.where(hit, values.index_select(0, positions), -1)
            slots = found if slots is None else torch.where(hit, found, slots)
            places.append((hit, positions))
        if slots is None:
            slots = torch.full((ids.numel(),), -1, dtype=torch.int64)
        return slots, places

    def set(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Maps unique ``ids`` to ``slots``: entries already there (stale ones) are overwritten in
        place, the rest sorted into the recent level."""
        if not ids.numel():
            return
        _, places = self.find(ids)
        new = torch.ones(ids.numel(), dtype=torch.bool)
        for level, (hit, positions) in zip((self._main, self._recent), places, strict=True):
            if hit is not None and bool(hit.any()):
                level[1][positions[hit]] = slots[hit]
                new &= ~hit
        if bool(new.any()):
            keys = torch.cat([self._recent[0], ids[new]])
            values = torch.cat([self._recent[1], slots[new]])
            order = torch.sort(keys).indices
            self._recent = (keys[order], values[order])

    def needs_rebuild(self) -> bool:
        """The recent level has outgrown its share: time for the owner's ``rebuild``."""
        recent = self._recent[0].numel()
        return recent >= MIN_RECENT_BEFORE_REBUILD and recent * 8 > self._main[0].numel()

    def rebuild(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Replaces everything with the unique ``ids`` -> ``slots`` (the live rows)."""
        order = torch.sort(ids).indices
        self._main = (ids[order].contiguous(), slots[order].contiguous())
        self._recent = _empty()
