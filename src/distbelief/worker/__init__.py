"""The worker role: one model replica trained with DownpourSGD against the shards, its training
loop with per-step hooks, and the device it trains on."""

from distbelief.worker.hooks import StepHook, StepInfo
from distbelief.worker.loop import train_loop, worker_batches
from distbelief.worker.replica import build_replica
from distbelief.worker.run import resolve_device, run_worker

__all__ = [
    "StepHook",
    "StepInfo",
    "build_replica",
    "resolve_device",
    "run_worker",
    "train_loop",
    "worker_batches",
]
