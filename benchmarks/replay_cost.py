"""Replay cost: what keeping the replay buffer (the sums of a worker's pushes that a shard's
checkpoint may lack) costs a push, and the memory it holds.

A shard served in this process on 127.0.0.1, once with periodic-checkpoint bookkeeping (its
replies number its checkpoints, the client sums each push) and once without, is pushed to with
``push_now`` in interleaved repeats; the printed ratio (per-push time with the buffer / without)
compares within one run. A checkpoint is saved every ``--pushes-per-checkpoint`` pushes, so the
buffer is released as in a job.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import machine
from distbelief.client import ParameterServerClient
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server.checkpoint import Checkpointer
from distbelief.sharding import TensorSpec
from distbelief.wire import serve

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIZES = {"LeNet-sized (62k floats)": 62_006, "4M floats": 4_000_000}


def _served(num_elements: int, tracked: bool, directory: Path):
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=1e-6))
    checkpointer = None
    if tracked:
        checkpointer = Checkpointer(shard, directory, 3600.0, on_finished=shard.checkpoint_finished)
        shard.track_checkpoints()
    server = serve("tcp://127.0.0.1:0", ShardService(shard))
    specs = [TensorSpec("w", (num_elements,), torch.float32)]
    client = ParameterServerClient([server.address], specs, timeout_s=60, worker_id="bench")
    client.handshake({torch.float32: torch.zeros(num_elements)})
    return server, client, checkpointer


def time_pushes(num_elements: int, tracked: bool, args: argparse.Namespace) -> tuple[float, int]:
    """(seconds per push, most bytes the buffer held)."""
    with tempfile.TemporaryDirectory() as directory:
        server, client, checkpointer = _served(num_elements, tracked, Path(directory))
        grads = {torch.float32: torch.randn(num_elements)}
        held_bytes = 0
        try:
            for _ in range(5):
                client.push_now(grads)
            elapsed_s = 0.0
            for i in range(args.pushes):
                if checkpointer is not None and i % args.pushes_per_checkpoint == 0:
                    checkpointer.save_if_changed()  # outside the timing: the shard's work
                started = time.perf_counter()
                client.push_now(grads)
                elapsed_s += time.perf_counter() - started
                sums = client.replays[0].sums.values()
                held_bytes = max(held_bytes, sum(t.nbytes for s in sums for t in s.tensors))
        finally:
            client.close()
            server.stop()
    return elapsed_s / args.pushes, held_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--pushes", type=machine.at_least(1), default=100, help="timed pushes per repeat"
    )
    parser.add_argument("--pushes-per-checkpoint", type=machine.at_least(1), default=20)
    parser.add_argument("--repeats", type=machine.at_least(1), default=5)
    parser.add_argument(
        "--out", type=machine.out_folder, default=RESULTS_DIR, help='folder, or "-" for none'
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, record_rows = [], []
    for label, num_elements in SIZES.items():
        times: dict[bool, list[float]] = {True: [], False: []}
        held = 0
        for _ in range(args.repeats):
            for tracked in (False, True):
                seconds, held_bytes = time_pushes(num_elements, tracked, args)
                times[tracked].append(seconds)
                held = max(held, held_bytes)
        without, with_buffer = statistics.median(times[False]), statistics.median(times[True])
        ratio = with_buffer / without
        held_slices = held / (4 * num_elements)
        rows.append([label, f"{1e3 * without:.3f}", f"{1e3 * with_buffer:.3f}", f"{ratio:.3f}"])
        rows[-1].append(f"{held_slices:.1f}")
        record_rows.append(
            {"size": label, "num_elements": num_elements, "push_s_without": without}
            | {"push_s_with": with_buffer, "ratio": ratio, "max_held_bytes": held}
        )
    settings = vars(args) | {"out": str(args.out)}
    record = {**machine.environment(), "settings": settings, "rows": record_rows}
    stem = args.out / f"replay_cost_cpu{os.cpu_count()}_{datetime.date.today():%Y%m%d}"
    description = (
        "push_now to one shard served in this process; median over repeats of the mean time "
        f"of {args.pushes} pushes, a checkpoint every {args.pushes_per_checkpoint} pushes. "
        "Held: the most the buffer held, in copies of the slice."
    )
    header = ["gradient", "ms/push without buffer", "ms/push with", "ratio", "held (slices)"]
    title = "Replay buffer cost"
    target = "-" if str(args.out) == "-" else stem
    print(machine.write_report(target, record, title, description, header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
