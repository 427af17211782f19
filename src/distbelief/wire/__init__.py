"""Bytes in, bytes out: frames, ops, the request/reply layer and channels. Knows nothing about
optimizers."""

from distbelief.wire.dtypes import WIRE_DTYPES, dtype_from_name, dtype_name
from distbelief.wire.message import Message
from distbelief.wire.ops import Op, OpRegistry, define_op
from distbelief.wire.rpc import RpcClient, connect
from distbelief.wire.rpc_server import RpcServer, Service, serve
from distbelief.wire.serving_pool import long_wait

__all__ = [
    "WIRE_DTYPES",
    "Message",
    "Op",
    "OpRegistry",
    "RpcClient",
    "RpcServer",
    "Service",
    "connect",
    "define_op",
    "dtype_from_name",
    "dtype_name",
    "long_wait",
    "serve",
]
