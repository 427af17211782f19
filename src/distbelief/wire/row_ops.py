"""The embedding row ops: what a row client asks of a shard's tables.

``ROWS_HELLO`` declares tables (name -> row width, and ``sizes``: name -> number of rows) and
returns the shard's row settings and counters (and, for the ``worker`` it names, the step of
that worker's last push it applied, ``pushed_step``). ``PULL_ROWS`` lists its tables and each
one's id count in its meta (``tables``, ``counts``) and carries one int64 ``ids`` tensor, the
tables' ids one after the other; it is answered with one float32 ``rows`` tensor, the tables'
rows flattened in the same order. ``PUSH_ROWS`` carries ``ids`` the same way and ``grads``, the
gradient rows flattened alike, with a session and sequence number so a retried push is applied
once, and the pushing ``worker`` and the ``clock`` (step) of the push. One tensor per request,
not one per table: a step of 26 tables costs one frame of each kind per shard. What the ops do
lives in ``server/row_service.py``.

A ``PULL_ROWS`` asks for at most ``MAX_PULL_ROWS_BYTES`` of rows: a request of a few kilobytes
of ids could otherwise make a shard allocate gigabytes (20,000 ids of a 65,536-wide table are
5 GB). A row client splits a larger pull into several requests; a shard refuses one past it.
"""

from __future__ import annotations

from distbelief.wire.ops import define_op

MAX_PULL_ROWS_BYTES = 256 * 1024**2
"""The most bytes of rows (ids x row width x 4) one ``PULL_ROWS`` may ask a shard for."""

ROWS_HELLO = define_op("ROWS_HELLO", 24)
"""Declare tables (``tables``: name -> row width; ``sizes``: name -> number of rows); the reply
describes the shard's tables (with ``pushed_step`` for the ``worker`` named)."""
PULL_ROWS = define_op("PULL_ROWS", 25)
"""The rows of the ids given per table (ids without a row read as zeros)."""
PUSH_ROWS = define_op("PUSH_ROWS", 26)
"""Unique ids and their summed gradient rows per table: one step of each table named."""
