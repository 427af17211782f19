"""Row sharding: which shard owns each embedding row id, and a batch's ids grouped by shard.

An id's shard is a pure function of the id and the number of shards, computed from a
splitmix64 mix of the id's 64 bits, so every worker and shard, on every machine and in every
run, agrees on the owner without talking. The mix is done with int64 tensor ops: torch int64
addition and multiplication wrap modulo 2^64, which is exactly the unsigned arithmetic the mix
needs, and right shifts are made logical by masking off the sign bits an arithmetic shift
copies in.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; the mask clears the copied sign bits.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 output for each int64 of ``x`` (its bits read as unsigned), as int64."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    return z ^ _shift_right(z, 31)


def _check_ids(ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"row ids must be a 1-D int64 tensor, got {_describe(ids)}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor"
    return type(value).__name__


def row_shard(ids: torch.Tensor, num_shards: int) -> torch.Tensor:
    """The shard in ``[0, num_shards)`` owning each id (any int64, negative included).

    Raises:
        ValueError: ``ids`` not a 1-D int64 tensor, or ``num_shards`` < 1.
    """
    _check_ids(ids)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    # The top 63 bits of the mix are non-negative, so % is the plain modulo.
    return _shift_right(mix64(ids), 1) % num_shards


def split_by_shard(ids: torch.Tensor, num_shards: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A batch's ids grouped by owner: ``result[shard] = (positions, ids)``.

    ``positions`` are the indices into ``ids`` (ascending) of the ids that shard owns, so
    ``rows[positions] = pulled_rows`` scatters a shard's answer back into batch order.

    Raises:
        ValueError: ``ids`` not a 1-D int64 tensor, or ``num_shards`` < 1.
    """
    shards = row_shard(ids, num_shards)
    order = torch.sort(shards, stable=True).indices
    counts = torch.bincount(shards, minlength=num_shards).tolist()
    return [(positions, ids[positions]) for positions in torch.split(order, counts)]
