"""The parameter server: shards that own slices of the model and the service that serves them."""

from distbelief.config import ConsistencyConfig
from distbelief.server.optimizers import server_optimizer_factory
from distbelief.server.parameter_server import ParameterServer
from distbelief.server.service import ShardService
from distbelief.server.shard import ParameterShard

__all__ = [
    "ConsistencyConfig",
    "ParameterServer",
    "ParameterShard",
    "ShardService",
    "server_optimizer_factory",
]
