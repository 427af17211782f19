"""What a shard remembers per client session or worker id, bounded.

Clients choose their sessions and worker ids (``DownpourSGD`` gives each instance a new id by
default), so a shard that keeps a value for every one it has seen grows for as long as it
serves: by one entry per client life, in its memory and in every checkpoint. It keeps the
most recently used ``MAX_CLIENT_SESSIONS`` instead, well above the clients a shard serves at
once (4096 connections by default), so that an entry still needed (a retried push's, a
restarted worker's) is never the one forgotten.
"""

from __future__ import annotations

from typing import TypeVar

MAX_CLIENT_SESSIONS = 16384

_Value = TypeVar("_Value")


def remember(latest: dict[str, _Value], key: str, value: _Value) -> None:
    """``latest[key] = value``, ``key`` now the most recent; the least recently remembered keys
    are forgotten past ``MAX_CLIENT_SESSIONS`` (a dict keeps insertion order: the first key
    is the least recent)."""
    latest.pop(key, None)
    while len(latest) >= MAX_CLIENT_SESSIONS:
        latest.pop(next(iter(latest)))
    latest[key] = value
