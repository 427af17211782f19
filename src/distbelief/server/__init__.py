"""The parameter server: shards that own slices of the model and the service that serves them.

Names load on first use: the launcher reads checkpoint files through this package
(``server/checkpoint_meta.py``) without loading torch."""

from distbelief.lazy import lazy_exports

_EXPORTS = {
    "ConsistencyConfig": "distbelief.config",
    "server_optimizer_factory": "distbelief.server.optimizers",
    "ParameterServer": "distbelief.server.parameter_server",
    "ShardService": "distbelief.server.service",
    "ParameterShard": "distbelief.server.shard",
}

__all__ = [
    "ConsistencyConfig",
    "ParameterServer",
    "ParameterShard",
    "ShardService",
    "server_optimizer_factory",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
