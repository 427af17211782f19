"""The warm start's op: what ends a warm start early.

A worker that waits for the warm start (``DownpourSGD(start_after_version=K)``) polls the shards
until they have applied K updates of the replica training alone. ``END_WARMSTART`` tells a shard
that the warm start is over whatever its version: that replica is gone for good (the launcher
gave it up), so the K updates will never come. From then on every reply that describes the
shard (``HELLO``, ``INIT``, ``STATS``) carries ``WARMSTART_ENDED_KEY: true``, and the waiting
workers start from the parameters as they are. The shard's side lives in
``server/service.py``, the waiting worker's in ``client/ps_client.py``, the launcher's in
``launch/warmstart.py``.
"""

from __future__ import annotations

from distbelief.wire.ops import define_op

END_WARMSTART = define_op("END_WARMSTART", 9)
"""The warm start is over (no metadata); the reply describes the shard (its ``version``)."""

WARMSTART_ENDED_KEY = "warmstart_ended"
"""In a shard's description: true once the shard was told ``END_WARMSTART`` (in this life)."""
