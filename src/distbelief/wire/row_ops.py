"""The embedding row ops: what a row client asks of a shard's tables.

``ROWS_HELLO`` declares tables (name -> row width) and returns the shard's row settings and
counters; ``PULL_ROWS`` carries one int64 id tensor per table, named by the table, and is
answered with one float32 ``[n, D]`` rows tensor per table, in the same order; ``PUSH_ROWS``
carries an ids tensor then a gradient-rows tensor per table (both named by the table), with a
session and sequence number so a retried push is applied once. The tables a request touches are
listed in its meta ``tables``. What the ops do lives in ``server/row_service.py``.
"""

from __future__ import annotations

from distbelief.wire.ops import define_op

ROWS_HELLO = define_op("ROWS_HELLO", 24)
"""Declare tables (``tables``: name -> row width); the reply describes the shard's tables."""
PULL_ROWS = define_op("PULL_ROWS", 25)
"""The rows of the ids given per table (ids without a row read as zeros)."""
PUSH_ROWS = define_op("PUSH_ROWS", 26)
"""Unique ids and their summed gradient rows per table: one step of each table named."""
