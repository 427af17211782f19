"""Bytes in, bytes out: frames, transports and backends. Knows nothing about optimizers."""

from distbelief.wire import tcp as _tcp  # noqa: F401  (registers the tcp:// backend)
from distbelief.wire.dtypes import WIRE_DTYPES, dtype_from_name, dtype_name
from distbelief.wire.message import Message, Op
from distbelief.wire.transport import Server, Transport, connect, serve, split_scheme

__all__ = [
    "WIRE_DTYPES",
    "Message",
    "Op",
    "Server",
    "Transport",
    "connect",
    "dtype_from_name",
    "dtype_name",
    "serve",
    "split_scheme",
]
