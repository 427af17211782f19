"""Error kinds on the wire: the exception a handler raised becomes a kind string in the error
reply, and the kind picks the exception the client raises. Both directions are this one table, so
a new typed refusal (a RemoteError subclass in errors.py) is one entry.
"""

from __future__ import annotations

from typing import NamedTuple

from distbelief.errors import (
    EvaluationNotOpenError,
    LayoutMismatchError,
    ModelMismatchError,
    PlacementRefusedError,
    PSError,
    RemoteError,
    ShardEmptyError,
    ShardListError,
    ShardRestartedError,
    TableSizeMismatchError,
    TableWidthMismatchError,
    TooManyConnectionsError,
    UnknownOpError,
    VectorMissingError,
)


class ErrorKind(NamedTuple):
    """One kind of refusal."""

    kind: str
    """Its name in an error reply's metadata."""
    sent_for: tuple[type[Exception], ...]
    """A handler raising one of these sends this kind."""
    raised_as: type[RemoteError]
    """What the client raises for this kind."""


TOO_MANY_CONNECTIONS = "too_many_connections"
"""The kind a server answers a connection over its cap with (then closes it)."""

ERROR_KINDS: tuple[ErrorKind, ...] = (
    ErrorKind("layout_mismatch", (LayoutMismatchError,), LayoutMismatchError),
    ErrorKind("shard_list", (ShardListError,), ShardListError),
    ErrorKind("table_size_mismatch", (TableSizeMismatchError,), TableSizeMismatchError),
    ErrorKind("table_width_mismatch", (TableWidthMismatchError,), TableWidthMismatchError),
    ErrorKind("model_mismatch", (ModelMismatchError,), ModelMismatchError),
    ErrorKind("evaluation_not_open", (EvaluationNotOpenError,), EvaluationNotOpenError),
    ErrorKind("shard_restarted", (ShardRestartedError,), ShardRestartedError),
    ErrorKind(TOO_MANY_CONNECTIONS, (TooManyConnectionsError,), TooManyConnectionsError),
    ErrorKind("placement_refused", (PlacementRefusedError,), PlacementRefusedError),
    ErrorKind("unknown_op", (UnknownOpError,), UnknownOpError),
    ErrorKind("shard_empty", (ShardEmptyError,), ShardEmptyError),
    ErrorKind("vector_missing", (VectorMissingError,), VectorMissingError),
    ErrorKind("bad_request", (ValueError, PSError), RemoteError),
)
"""The first kind whose ``sent_for`` matches wins: list a subclass before its base."""

BAD_REQUEST = "bad_request"
"""The kind of a request refused before its handler ran (a malformed frame, an unknown op)."""

INTERNAL = "internal"
"""The kind of any other exception: a bug in the handler, which the server logs."""

_RAISED_AS = {entry.kind: entry.raised_as for entry in ERROR_KINDS}


def kind_of(error: Exception) -> str:
    """The kind a server sends for ``error`` raised by a handler."""
    for entry in ERROR_KINDS:
        if isinstance(error, entry.sent_for):
            return entry.kind
    return INTERNAL


def error_for_kind(kind: object) -> type[RemoteError]:
    """The exception a client raises for an error reply of ``kind`` (unknown: RemoteError)."""
    return _RAISED_AS.get(kind, RemoteError) if isinstance(kind, str) else RemoteError
