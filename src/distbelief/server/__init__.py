"""The parameter server: shards that own slices of the model and the service that serves them."""

from distbelief.config import STALENESS_POLICIES, ConsistencyConfig
from distbelief.server.optimizers import SERVER_OPTIMIZER_NAMES, server_optimizer_factory
from distbelief.server.parameter_server import ParameterServer
from distbelief.server.service import ShardService
from distbelief.server.shard import ParameterShard

__all__ = [
    "SERVER_OPTIMIZER_NAMES",
    "STALENESS_POLICIES",
    "ConsistencyConfig",
    "ParameterServer",
    "ParameterShard",
    "ShardService",
    "server_optimizer_factory",
]
