"""The worker's side of the parameter server: push and pull against all shards at once."""

from distbelief.client.ps_client import ParameterServerClient, parse_addresses

__all__ = ["ParameterServerClient", "parse_addresses"]
