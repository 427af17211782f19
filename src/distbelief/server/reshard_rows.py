"""Row resharding: every old shard's row tables merged and dealt out again by ``row_shard`` for
another shard count, with the counters kept consistent. Pure: checkpoints in, state dicts out;
no files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from distbelief.errors import CheckpointError
from distbelief.server.row_checkpoint import RowTablesCheckpoint, merge_checksums, table_checksum
from distbelief.server.row_table import recency_order
from distbelief.sharding.rows import row_shard

_LIKE_KEYS = ("dim", "optimizer", "settings")
"""What every shard's copy of one table must agree on."""


def reshard_row_tables(
    checkpoints: Sequence[RowTablesCheckpoint], num_shards: int
) -> list[dict[str, dict]]:
    """The row tables of ``checkpoints`` (every old shard of one folder) for ``num_shards``.

    A table that some old shards lack counts as empty there. Returns, per new shard, table
    name -> state dict with ``"settings"``, ready for ``save_row_tables``.

    Counters. ``num_steps`` becomes the largest over the old shards: LazyAdam's bias
    correction uses the table's step, one per table as SparseAdam keeps one per parameter, so
    when the old shards agree (every push reached every shard) the updates continue exactly,
    and when they do not, the largest is the count of a shard that saw every push. Each row's
    ``last_step`` moves by as much as its table's step did, so its age (steps since its last
    push), which LRU eviction and the time to live read, is kept; so does each pending id's.
    ``num_admitted`` and ``num_evicted`` keep their sums over the shards: the evictions are
    dealt out evenly and each new shard admitted its rows plus its evictions, so
    ``admitted - evicted = rows`` holds on every shard, as a table keeps it.

    Raises:
        ValueError: ``num_shards`` < 1.
        CheckpointError: the old shards disagree on a table's dim, optimizer, state or
            settings, or two of them hold the same id.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    names = list(dict.fromkeys(name for checkpoint in checkpoints for name in checkpoint.tables))
    new: list[dict[str, dict]] = [{} for _ in range(num_shards)]
    for name in names:
        held = [(c.shard_id, c.tables[name]) for c in checkpoints if name in c.tables]
        for shard_id, table in enumerate(_split_table(name, held, num_shards)):
            new[shard_id][name] = table
    return new


def row_totals(shards: Sequence[Mapping[str, Mapping]]) -> dict[str, dict]:
    """Per table over all ``shards`` (each table name -> state dict): the merged checksum, the
    largest ``num_steps``, the summed ``num_admitted`` and ``num_evicted``, and what every copy
    shares. Equal before and after a reshard when no row, state or count was lost."""
    totals: dict[str, dict] = {}
    for tables in shards:
        for name, table in tables.items():
            entry = totals.setdefault(
                name,
                {"checksum": [], "num_steps": 0, "num_admitted": 0, "num_evicted": 0},
            )
            entry["checksum"].append(table_checksum(table))
            entry["num_steps"] = max(entry["num_steps"], int(table["num_steps"]))
            entry["num_admitted"] += int(table["num_admitted"])
            entry["num_evicted"] += int(table["num_evicted"])
            entry.update({key: table.get(key) for key in _LIKE_KEYS})
            entry["state"] = {key: tuple(t.shape[1:]) for key, t in table["state"].items()}
    for entry in totals.values():
        entry["checksum"] = merge_checksums(entry["checksum"])
    return totals


def _check_alike(name: str, held: Sequence[tuple[int, Mapping]]) -> None:
    first_id, first = held[0]
    first_state = {key: t.shape[1:] for key, t in first["state"].items()}
    for shard_id, table in held[1:]:
        for key in _LIKE_KEYS:
            if table.get(key) != first.get(key):
                raise CheckpointError(
                    f"rows-shard{shard_id}.json: table {name!r} has {key} {table.get(key)!r}, "
                    f"rows-shard{first_id}.json has {first.get(key)!r}"
                )
        state = {key: t.shape[1:] for key, t in table["state"].items()}
        if state != first_state:
            raise CheckpointError(
                f"rows-shard{shard_id}.json: table {name!r} keeps row state {sorted(state)}, "
                f"rows-shard{first_id}.json {sorted(first_state)}"
            )


def _check_unique(name: str, ids: torch.Tensor, what: str) -> None:
    unique, counts = torch.unique(ids, return_counts=True)
    if unique.numel() != ids.numel():
        twice = int(unique[counts > 1][0])
        raise CheckpointError(f"table {name!r}: {what} {twice} is held by two shards")


def _share(total: int, shard_id: int, num_shards: int) -> int:
    """Shard ``shard_id``'s part of ``total`` dealt out evenly (the parts sum to ``total``)."""
    return total * (shard_id + 1) // num_shards - total * shard_id // num_shards


def _merge(name: str, held: Sequence[tuple[int, Mapping]]) -> dict:
    """One table of every old shard's rows (least recently pushed first, ties by id: the order
    ``RowTable.state_dict()`` writes) and pending ids (by id), with the largest step count."""
    _check_alike(name, held)
    tables = [table for _, table in held]
    num_steps = max(int(table["num_steps"]) for table in tables)
    ids = torch.cat([table["ids"] for table in tables])
    # Rebased so that every row keeps its age (see reshard_row_tables).
    last_step = torch.cat(
        [table["last_step"] + (num_steps - int(table["num_steps"])) for table in tables]
    )
    pending_ids = torch.cat([table["pending_ids"] for table in tables])
    pending_last_step = torch.cat(
        [table["pending_last_step"] + (num_steps - int(table["num_steps"])) for table in tables]
    )
    _check_unique(name, ids, "row id")
    _check_unique(name, pending_ids, "pending id")
    order = recency_order(ids, last_step)
    pending_order = torch.sort(pending_ids).indices
    return {
        **tables[0],
        "ids": ids[order],
        "values": torch.cat([table["values"] for table in tables])[order],
        "state": {
            key: torch.cat([table["state"][key] for table in tables])[order]
            for key in tables[0]["state"]
        },
        "last_step": last_step[order],
        "pending_ids": pending_ids[pending_order],
        "pending_counts": torch.cat([table["pending_counts"] for table in tables])[pending_order],
        "pending_last_step": pending_last_step[pending_order],
        "num_steps": num_steps,
        "num_admitted": sum(int(table["num_admitted"]) for table in tables),
        "num_evicted": sum(int(table["num_evicted"]) for table in tables),
    }


def _split_table(name: str, held: Sequence[tuple[int, Mapping]], num_shards: int) -> list[dict]:
    merged = _merge(name, held)
    owners = row_shard(merged["ids"], num_shards)
    pending_owners = row_shard(merged["pending_ids"], num_shards)
    # 0 for tables a RowTable wrote (admitted - evicted = rows); dealt out, it keeps the sum.
    unexplained = merged["num_admitted"] - merged["ids"].numel() - merged["num_evicted"]
    new = []
    for shard_id in range(num_shards):
        rows, pending = owners == shard_id, pending_owners == shard_id
        evicted = _share(merged["num_evicted"], shard_id, num_shards)
        admitted = int(rows.sum()) + evicted + _share(unexplained, shard_id, num_shards)
        new.append(
            {
                **merged,
                **{key: merged[key][rows] for key in ("ids", "values", "last_step")},
                "state": {key: tensor[rows] for key, tensor in merged["state"].items()},
                **{
                    key: merged[key][pending]
                    for key in ("pending_ids", "pending_counts", "pending_last_step")
                },
                "num_admitted": admitted,
                "num_evicted": evicted,
                "settings": dict(merged.get("settings") or {}),
            }
        )
    return new
