"""The worker's side of the parameter server: push and pull against all shards at once, and
the shards' named vectors (Sandblaster)."""

from distbelief.client.ps_client import ParameterServerClient
from distbelief.client.vectors import ShardVectors
from distbelief.hosts import parse_addresses

__all__ = ["ParameterServerClient", "ShardVectors", "parse_addresses"]
