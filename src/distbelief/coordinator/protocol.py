"""The coordinator's ops, which workers send it, and the metadata each carries.

Codes 16 and up belong to the coordinator (the shards' ops are below 16). Every request names
the worker's life: ``worker`` (its id, e.g. ``worker2``) and ``session`` (random per life); the
coordinator keys everything by ``<worker>-<session>``. Loss sums travel as ``float.hex``
strings, exact and able to carry inf and nan (JSON numbers cannot).

Every reply names the coordinator's life, ``coordinator`` (random per process start). A
restarted coordinator goes back to its last checkpoint and numbers its evaluations again from
there, so a report carries the life its task came from: one from an earlier life is ``stale``
(its evaluation number may now be another point), and a worker that sees a new life drops its
bundle and the point it had read.

``WORK`` request::

    {"worker": str, "session": str, "max_wait_s": float,                     # optional
     "finished": {"evaluation": int, "portion": int, "loss_sum": hex str,    # optional
                  "coordinator": str}}                          # the task's life, optional

``WORK`` reply::

    {"finished": "accepted" | "duplicate" | "stale" | "lost",   # present iff one was reported
     "action": "work" | "wait" | "stop" | "lost",
     "coordinator": str,                                          # its life
     "task": {"evaluation": int, "point": str, "portion": int, "backup": bool,
              "batch": BatchPlan.to_json()}}                        # present iff action is work

``accepted``: the worker adds the portion's gradient to its bundle; ``duplicate``: another
worker finished it first, drop it; ``stale``: its evaluation is over; ``lost``: this life was
declared lost (its uncommitted portions were handed out again): drop the bundle and start a new
session. ``wait``: ask again (the coordinator held the request up to ``max_wait_s`` already,
or answered at once because the worker holds accepted portions: it pushes them first).

``BUNDLE`` request (after pushing the bundle to every shard with ACCUMULATE, also when a shard
answered that it does not have the evaluation open: a restarted shard lost it, and only the
coordinator's commit, which that shard refuses, tells the coordinator to go back)::

    {"worker": str, "session": str, "evaluation": int, "bundle": str, "portions": [int, ...],
     "coordinator": str}                            # the life that accepted them, optional

A bundle's id is ``<worker>-<session>-<n>``, unique per life; the coordinator refuses one that
does not start with the sender's ``<worker>-<session>-``.

``BUNDLE`` reply: ``{"status": "accepted" | "refused" | "stale" | "lost", "coordinator": str}``;
``accepted`` means the bundle is committed on every shard; on any other status its portions are
handed out again.
"""

from __future__ import annotations

from distbelief.wire.ops import define_op

WORK = define_op("WORK", 16)
"""Ask for a portion (reporting the one just finished): answered with a task, wait or stop."""
BUNDLE = define_op("BUNDLE", 17)
"""A bundle of accepted portions was pushed to every shard: commit it."""

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
STALE = "stale"
LOST = "lost"
REFUSED = "refused"

WORK_ACTION = "work"
WAIT_ACTION = "wait"
STOP_ACTION = "stop"
LOST_ACTION = "lost"

WORKER_ID_MAX_CHARS = 32
"""Longest worker id a request may carry."""
SESSION_MAX_CHARS = 16
"""Longest session a request may carry (so ``<worker>-<session>-<n>`` fits a vector name)."""
LIFE_MAX_CHARS = 32
"""Longest coordinator life a request may carry."""


def worker_key(meta: dict) -> str:
    """``<worker>-<session>`` of a request: the life the coordinator keys its state by.

    Raises:
        ValueError: either is missing, not a string or too long.
    """
    parts = []
    for field, max_chars in (("worker", WORKER_ID_MAX_CHARS), ("session", SESSION_MAX_CHARS)):
        value = meta.get(field)
        if not isinstance(value, str) or not 0 < len(value) <= max_chars:
            raise ValueError(f"{field} must be a string of 1-{max_chars} chars, got {value!r}")
        parts.append(value)
    return "-".join(parts)


def life_of(meta: dict) -> str | None:
    """The coordinator life a report names (None: it names none).

    Raises:
        ValueError: it is not a string of 1-``LIFE_MAX_CHARS`` chars.
    """
    value = meta.get("coordinator")
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= LIFE_MAX_CHARS):
        raise ValueError(f"coordinator must be a string of 1-{LIFE_MAX_CHARS} chars, got {value!r}")
    return value


def loss_to_wire(loss_sum: float) -> str:
    """A loss sum as its exact hex form (``float.hex``; inf and nan included)."""
    return float(loss_sum).hex()


def loss_from_wire(value: object) -> float:
    """Inverse of :func:`loss_to_wire`.

    Raises:
        ValueError: ``value`` is not a float's hex form.
    """
    if not isinstance(value, str):
        raise ValueError(f"loss_sum must be a float.hex string, got {value!r}")
    try:
        return float.fromhex(value)
    except (ValueError, OverflowError):  # OverflowError: a hex number beyond any float
        raise ValueError(f"loss_sum must be a float.hex string, got {value!r:.80}") from None
