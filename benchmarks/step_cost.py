"""Step cost: what one DownpourSGD step (n_push = n_pull = 1, LeNet's gradient, no forward or
backward) costs the worker and the shard, in Python calls and in time.

The Python calls are counted exactly (a profile hook on every thread of a worker and a shard
served in this process), so two versions of the code compare without noise; the times (wall,
worker CPU and shard CPU per step, with the shard in its own process) are medians of repeats.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import threading
import time

import torch
from torch import nn

import machine
from overhead import CONFIGS, Trainer, make_batches
from server_host import ServerHost, start_sgd_shard

LR = 0.01
WARMUP_STEPS = 50


def _trainer(address: str) -> Trainer:
    trainer = Trainer("lenet", CONFIGS[1], address)  # downpour n=1, asynchronous
    images, labels = make_batches(0)[0]
    nn.functional.cross_entropy(trainer.model(images), labels).backward()
    for _ in range(WARMUP_STEPS):
        trainer.optimizer.step()
    trainer.optimizer.flush()
    return trainer


def count_calls(num_steps: int) -> tuple[float, float]:
    """(distbelief's Python calls, all Python calls) per step, worker and shard together."""
    counts: collections.Counter = collections.Counter()
    counting = threading.Event()

    def profile(frame, event, _arg) -> None:
        if event == "call" and counting.is_set():
            counts["distbelief" in frame.f_code.co_filename] += 1

    threading.setprofile(profile)  # every thread started from now on: the shard's and lanes
    server = start_sgd_shard(LR)
    trainer = _trainer(server.address)
    sys.setprofile(profile)
    counting.set()
    for _ in range(num_steps):
        trainer.optimizer.step()
    trainer.optimizer.flush()
    counting.clear()
    sys.setprofile(None)
    threading.setprofile(None)
    trainer.close()
    server.stop()
    return counts[True] / num_steps, (counts[True] + counts[False]) / num_steps


def _process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_steps(num_steps: int, repeats: int) -> dict[str, float]:
    """Median wall, worker CPU and shard CPU microseconds per step (shard in its own process)."""
    samples = collections.defaultdict(list)
    with ServerHost(start_sgd_shard, LR, name="shard-host") as host:
        trainer = _trainer(host.start_server())
        pid = host._process.pid
        for _ in range(repeats):
            wall, cpu, shard = time.perf_counter(), time.process_time(), _process_cpu_s(pid)
            for _ in range(num_steps):
                trainer.optimizer.step()
            trainer.optimizer.flush()
            samples["wall_us"].append((time.perf_counter() - wall) / num_steps * 1e6)
            samples["worker_cpu_us"].append((time.process_time() - cpu) / num_steps * 1e6)
            samples["shard_cpu_us"].append((_process_cpu_s(pid) - shard) / num_steps * 1e6)
        trainer.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--steps", type=machine.at_least(1), default=2000, help="steps per timed repeat"
    )
    parser.add_argument("--repeats", type=machine.at_least(1), default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours, everything = count_calls(300)
    print(f"python calls per step: {ours:.1f} in distbelief, {everything:.1f} in all")
    times = time_steps(args.steps, args.repeats)
    print(", ".join(f"{name} {value:.0f}" for name, value in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
