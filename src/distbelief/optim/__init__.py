"""Optimizers that train a replica against the parameter server."""

from distbelief.optim.downpour import DownpourSGD

__all__ = ["DownpourSGD"]
