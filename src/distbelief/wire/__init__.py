"""Bytes in, bytes out: frames, ops, the request/reply layer and channels. Knows nothing about
optimizers."""

from distbelief.lazy import lazy_exports

_EXPORTS = {
    "WIRE_DTYPES": "distbelief.wire.dtypes",
    "dtype_from_name": "distbelief.wire.dtypes",
    "dtype_name": "distbelief.wire.dtypes",
    "Message": "distbelief.wire.message",
    "Op": "distbelief.wire.ops",
    "OpRegistry": "distbelief.wire.ops",
    "define_op": "distbelief.wire.ops",
    "RpcClient": "distbelief.wire.rpc",
    "connect": "distbelief.wire.rpc",
    "RpcServer": "distbelief.wire.rpc_server",
    "Service": "distbelief.wire.rpc_server",
    "serve": "distbelief.wire.rpc_server",
    "long_wait": "distbelief.wire.serving_pool",
}
"""Loaded on first use, and torch only at the first tensor sent or received: a process whose
frames carry none (the launcher: its job key, its shards' counters) never imports it."""

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
