"""Channel-only benchmark: what the byte channels themselves move, without the request layer,
the shard or the client: one large write (4 MB, 100 MB) from a client to a server in another
process, the server reading it into a preallocated tensor (and, for push+apply, adding it to
its parameters), then an 8-byte reply. TCP and shared memory through the same ``dial`` and
``listen`` the project uses, with the job-key handshake; medians of per-call times after a
warm-up, the two channels alternating repeat by repeat.

It answers one question: how much faster can the shared-memory channel make a transfer on this
machine, whatever the layers above it do? (``benchmarks/wire.py`` measures those layers.)

Usage: ``PYTHONPATH=src python benchmarks/channels.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

import machine
from distbelief.wire.channels import dial, listen
from distbelief.wire.security import WireSecurity

SIZES_BYTES = (4_000_000, 100_000_000)
CALLS = {4_000_000: 40, 100_000_000: 6}
_KEY = b"channel-benchmark-key-0123456789"
_REPLY = b"8 bytes."


def _serve(addresses, scheme: str, apply: bool, repeats: int) -> None:
    torch.set_num_threads(1)
    # The transport named on both ends: a tcp:// channel on one host would otherwise switch
    # to shared memory by itself.
    listener = listen(
        f"{scheme}://127.0.0.1:0", security=WireSecurity(auth_key=_KEY), transport=scheme
    )
    addresses.put(listener.address)
    channel = listener.accept(30).open(30)
    for size in SIZES_BYTES:
        received, params = torch.empty(size // 4), torch.zeros(size // 4)
        view = memoryview(received.numpy()).cast("B")
        for _ in range((CALLS[size] + 3) * repeats):
            got = 0
            while got < size:
                count = channel.recv_into(view[got:], size - got)
                if count == 0:
                    return
                got += count
            if apply:
                params.add_(received, alpha=-0.1)
            channel.sendall(_REPLY)
    channel.close()
    listener.close()


def _client(scheme: str, apply: bool, repeats: int) -> dict[int, list[float]]:
    context = mp.get_context("fork")
    addresses = context.Queue()
    server = context.Process(target=_serve, args=(addresses, scheme, apply, repeats))
    server.start()
    channel = dial(
        addresses.get(timeout=30),
        timeout_s=30,
        security=WireSecurity(auth_key=_KEY),
        transport=scheme,
    )
    reply = memoryview(bytearray(len(_REPLY)))
    samples: dict[int, list[float]] = {}
    try:
        for size in SIZES_BYTES:
            data = memoryview(torch.randn(size // 4).numpy()).cast("B")
            times = []
            for _ in range((CALLS[size] + 3) * repeats):
                started = time.perf_counter()
                channel.sendall(data)
                got = 0
                while got < len(_REPLY):
                    got += channel.recv_into(reply[got:], len(_REPLY) - got)
                times.append(time.perf_counter() - started)
            samples[size] = times
    finally:
        channel.close()
        server.join(60)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=machine.at_least(1), default=3)
    args = parser.parse_args(argv)
    print("| size | op | tcp ms (median) | shm ms (median) | tcp / shm | tcp GB/s | shm GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for apply in (False, True):
        medians = {}
        for scheme in ("tcp", "shm"):
            samples = _client(scheme, apply, args.repeats)
            # The first three calls of each size warm the buffers and the pages up.
            medians[scheme] = {
                size: statistics.median(times[3:]) for size, times in samples.items()
            }
        for size in SIZES_BYTES:
            tcp_s, shm_s = medians["tcp"][size], medians["shm"][size]
            print(
                f"| {size / 1e6:g} MB | {'push+apply' if apply else 'transfer'} | "
                f"{tcp_s * 1e3:.3f} | {shm_s * 1e3:.3f} | {tcp_s / shm_s:.2f} | "
                f"{size / tcp_s / 1e9:.1f} | {size / shm_s / 1e9:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(machine.run_main(main))
