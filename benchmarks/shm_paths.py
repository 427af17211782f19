"""Same-host paths benchmark: on one shared-memory connection, a push whose gradient is placed
in shared push buffers against one whose gradient travels through the channel's ring, and a
pull read straight from the shard's shared parameters against one answered through the ring;
4 MB and 100 MB, one shard in another process.

The ring path is the same client with its shared memory turned off (what a same-host
connection did before ``wire/shared_params.py``). Ratio = ring time / shared time, the median
of back-to-back pairs in one run.

Usage: ``PYTHONPATH=src:benchmarks python benchmarks/shm_paths.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import machine
import wire
from server_host import ServerHost, start_sgd_shard

SIZES = {1_000_000: 40, 25_000_000: 4}
"""numel -> calls per timed batch."""


def _seconds_per_call(call, calls: int) -> float:
    call()  # the first after a switch warms the buffers up
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=machine.at_least(1), default=9)
    args = parser.parse_args(argv)
    print("| size | op | ring us | shared us | ring / shared |")
    print("|---|---|---:|---:|---:|")
    with ServerHost(start_sgd_shard, wire.SERVER_LR, name="shm-paths-shard") as host:
        for numel, calls in SIZES.items():
            shared = ring = None
            try:
                shared = wire.ProjectClient(_shm_address(host), numel, "shm")
                ring = wire.ProjectClient(_shm_address(host), numel, "shm", shared_memory=False)
                for op in ("push", "pull"):
                    pairs = [
                        (
                            _seconds_per_call(getattr(ring, op), calls),
                            _seconds_per_call(getattr(shared, op), calls),
                        )
                        for _ in range(args.repeats)
                    ]
                    ring_s = statistics.median(r for r, _ in pairs)
                    shared_s = statistics.median(s for _, s in pairs)
                    ratio = statistics.median(r / s for r, s in pairs)
                    label = "push+apply" if op == "push" else "pull"
                    print(
                        f"| {numel * 4 / 1e6:g} MB | {label} | {ring_s * 1e6:.0f} | "
                        f"{shared_s * 1e6:.0f} | {ratio:.2f} |"
                    )
            finally:
                for client in (shared, ring):
                    if client is not None:
                        client.close()
    return 0


def _shm_address(host: ServerHost) -> str:
    return host.start_server().replace("tcp://", "shm://")


if __name__ == "__main__":
    raise SystemExit(machine.run_main(main))
