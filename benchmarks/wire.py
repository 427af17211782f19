"""Wire benchmark: the project's push+apply and pull against a raw-socket baseline, and over
shared memory against TCP, same run.

Both servers run in spawned processes on 127.0.0.1 and do the same work (recv_into a
preallocated buffer, ``w -= lr * g``, reply; or send ``w``); ratio = raw time / project time,
the median of back-to-back pairs. The project's side is ``ParameterServerClient.push_now`` /
``pull_now`` over plain TCP; the same client to the same kind of shard over the shared-memory
channel gives the "shm/tcp" ratio (project-over-TCP time / project-over-shm time): there a pull
copies the shard's parameters straight from its shared memory, and a push leaves the gradient
in push buffers the shard applies from (``wire/shared_params.py``). What limits
the ratio (measured, see benchmarks/README.md): a fixed cost of Python per request (~130-200
us: metadata, framing, the shard's bookkeeping), which decides tiny requests and part of 1M; a
pull after a push also pays the shard's snapshot copy of ``w`` (the "vs raw+cp" column compares
against a raw server that always makes that copy).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import json
import os
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

import machine
from distbelief.client import ParameterServerClient
from distbelief.files import write_text_atomic
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire.channels.shm import TRANSPORT_ENV
from server_host import ServerHost, start_sgd_shard

SERVER_LR = 1e-3
TINY_NUMEL = 1
DEFAULT_SIZES = "1M,25M"
RAW_HEADER = struct.Struct("!BQ")  # op, numel
RAW_REPLY = struct.Struct("!Q")  # version
OP_PUSH, OP_PULL, OP_PULL_SNAPSHOT = 1, 2, 3
SMALL_PAYLOAD_BYTES = 64 * 1024
SOCKET_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
IDLE_POLL_S = 0.2
NO_RETRY_S = 0.0
"""A benchmark fails fast: retrying a dead server would hang Ctrl-C and distort timings."""
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- server processes


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    received = 0
    while received < view.nbytes:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise ConnectionResetError("peer closed mid-message")
        received += count


def _recv_header(sock: socket.socket, view: memoryview) -> bool:
    """Read one header; False if the peer closed the connection cleanly between messages."""
    count = sock.recv_into(view)
    if count == 0:
        return False
    _recv_exact(sock, view[count:])
    return True


class _RawState:
    """One raw connection's tensors for one size (allocated once, reused by every request)."""

    def __init__(self, numel: int) -> None:
        self.weights = torch.zeros(numel)
        self.grads = torch.empty(numel)
        self.snapshot = torch.empty(numel)
        self.version = 0


class RawServer:
    """The baseline: a fixed header, recv_into preallocated tensors, ``add_``, a tiny reply."""

    def __init__(self, lr: float) -> None:
        self._lr = lr
        self._stopping = threading.Event()
        self._connections: list[tuple[socket.socket, threading.Thread]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(IDLE_POLL_S)
        self.address = "{}:{}".format(*self._listener.getsockname()[:2])
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(SOCKET_TIMEOUT_S)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._connections.append((sock, thread))
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        header = bytearray(RAW_HEADER.size)
        states: dict[int, _RawState] = {}
        with contextlib.suppress(OSError), sock:
            while _recv_header(sock, memoryview(header)):
                op, numel = RAW_HEADER.unpack(header)
                if numel not in states:
                    states[numel] = _RawState(numel)
                self._answer(sock, op, states[numel])

    def _answer(self, sock: socket.socket, op: int, state: _RawState) -> None:
        if op == OP_PUSH:
            _recv_exact(sock, _byte_view(state.grads))
            state.weights.add_(state.grads, alpha=-self._lr)
            state.version += 1
            sock.sendall(RAW_REPLY.pack(state.version))
        elif op == OP_PULL_SNAPSHOT:
            # What the shard does on a pull: copy a consistent snapshot, then send the copy.
            state.snapshot.copy_(state.weights)
            sock.sendall(_byte_view(state.snapshot))
        else:
            sock.sendall(_byte_view(state.weights))

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        self._thread.join(STOP_TIMEOUT_S)
        for sock, thread in self._connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            thread.join(STOP_TIMEOUT_S)


# ---------------------------------------------------------------- clients


@contextlib.contextmanager
def _transport(name: str):
    """Channels made inside use transport ``name`` (the dialer reads it when it is made)."""
    previous = os.environ.get(TRANSPORT_ENV)
    os.environ[TRANSPORT_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[TRANSPORT_ENV]
        else:
            os.environ[TRANSPORT_ENV] = previous


class ProjectClient:
    """The project's ParameterServerClient on a one-tensor model of ``numel`` float32, over
    ``transport`` (tcp: plain TCP; shm: the shared-memory channel, refused if not granted)."""

    def __init__(
        self, address: str, numel: int, transport: str = "tcp", *, shared_memory: bool = True
    ) -> None:
        specs = tensor_specs([("weights", torch.empty(numel))])
        layout = FlatLayout(specs)
        with _transport(transport):
            self._client = ParameterServerClient(
                [address],
                specs,
                timeout_s=SOCKET_TIMEOUT_S,
                retry_timeout_s=NO_RETRY_S,
                shared_memory=shared_memory,
            )
        try:
            self._client.handshake(layout.allocate())
        except BaseException:
            self._client.close()
            raise
        # As DownpourSGD allocates its outbox: where the shard shares memory, a push from it
        # is applied where it lies.
        self._grads = self._client.shared_outbox(layout.sizes)
        self._grads[torch.float32].fill_(1.0)
        self._out = layout.allocate()
        self.pulled = self._out[torch.float32]
        channel_kind = type(self._client._transports[0]._channel).__name__
        if channel_kind != {"tcp": "TcpChannel", "shm": "ShmChannel"}[transport]:
            raise AssertionError(f"asked for {transport}, connected over {channel_kind}")

    def push(self) -> None:
        self._client.push_now(self._grads)

    def pull(self) -> None:
        self._client.pull_now(self._out)

    def close(self) -> None:
        self._client.close()


class RawClient:
    """The baseline client: sendall/recv_into on preallocated buffers, TCP_NODELAY."""

    def __init__(self, address: str, numel: int) -> None:
        host, port = address.rsplit(":", 1)
        self._sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(SOCKET_TIMEOUT_S)
        self._grads = torch.ones(numel)
        self.pulled = torch.empty(numel)
        self._reply = bytearray(RAW_REPLY.size)
        self._push_header = RAW_HEADER.pack(OP_PUSH, numel)
        self._pull_header = RAW_HEADER.pack(OP_PULL, numel)
        self._pull_snapshot_header = RAW_HEADER.pack(OP_PULL_SNAPSHOT, numel)

    def push(self) -> None:
        payload = _byte_view(self._grads)
        if payload.nbytes <= SMALL_PAYLOAD_BYTES:
            self._sock.sendall(self._push_header + payload.tobytes())
        else:
            self._sock.sendall(self._push_header)
            self._sock.sendall(payload)
        _recv_exact(self._sock, memoryview(self._reply))

    def pull(self) -> None:
        self._sock.sendall(self._pull_header)
        _recv_exact(self._sock, _byte_view(self.pulled))

    def pull_snapshot(self) -> None:
        """A pull whose server first copies ``w`` to a snapshot buffer, as the shard does."""
        self._sock.sendall(self._pull_snapshot_header)
        _recv_exact(self._sock, _byte_view(self.pulled))

    def close(self) -> None:
        self._sock.close()


def _check_roundtrip(client, lr: float) -> None:
    """One push of ones then a pull must give ``-lr`` everywhere (servers start at zero)."""
    client.push()
    client.pull()
    expected = torch.full_like(client.pulled, -lr)
    if not torch.allclose(client.pulled, expected):
        raise AssertionError(f"{type(client).__name__}: pull after push is not -lr")


# ---------------------------------------------------------------- measurement


def _seconds_per_call(fn: Callable[[], object], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def _median_seconds(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    return statistics.median(_seconds_per_call(fn, iterations) for _ in range(repeats))


TARGET_NUMELS = (1_000_000, 25_000_000)
"""The sizes the targets are set at (4 MB and 100 MB of float32): none elsewhere, not for
tiny requests (their fixed Python cost decides them) nor for ``--quick``'s 100K."""


def _target_ratio(numel: int) -> float | None:
    """Project over TCP against the raw loop: >= 0.95 at 4 MB and 100 MB."""
    return 0.95 if numel in TARGET_NUMELS else None


def _shm_target_ratio(numel: int) -> float | None:
    """Project over shared memory against project over TCP: >= 3x at 4 MB and 100 MB."""
    return 3.0 if numel in TARGET_NUMELS else None


def _verdict(ratio: float, target: float | None) -> str | None:
    return None if target is None else ("PASS" if ratio >= target else "BELOW")


def _iterations(numel: int, args: argparse.Namespace) -> int:
    if numel == TINY_NUMEL:
        return args.tiny_iterations
    return max(2, args.budget_mb * 1_000_000 // (4 * numel))


def _measure_op(calls: dict[str, Callable[[], object]], iterations: int, repeats: int) -> dict:
    """Median seconds per request of each call; repeats interleave so noise hits all alike."""
    for call in calls.values():
        _seconds_per_call(call, max(3, iterations))
    samples_s: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        names = list(calls) if repeat % 2 == 0 else list(reversed(calls))
        for name in names:
            samples_s[name].append(_seconds_per_call(calls[name], iterations))
    return samples_s


def _paired_ratio(baseline_s: list[float], measured_s: list[float]) -> float:
    """Median over repeats of baseline/measured timed back to back: load drift cancels out."""
    return statistics.median(b / m for b, m in zip(baseline_s, measured_s, strict=True))


def _make_row(numel: int, op: str, iterations: int, samples_s: dict[str, list[float]]) -> dict:
    payload_bytes = 4 * numel
    median_s = {name: statistics.median(values) for name, values in samples_s.items()}
    ratio = _paired_ratio(samples_s["raw"], samples_s["project"])
    target = _target_ratio(numel)
    row = {
        "numel": numel,
        "op": op,
        "payload_bytes": payload_bytes,
        "iterations": iterations,
        "project_us": median_s["project"] * 1e6,
        "raw_us": median_s["raw"] * 1e6,
        "project_mb_per_s": payload_bytes / median_s["project"] / 1e6,
        "raw_mb_per_s": payload_bytes / median_s["raw"] / 1e6,
        "ratio": ratio,
        "target_ratio": target,
        "verdict": _verdict(ratio, target),
        "samples_us": {name: [s * 1e6 for s in values] for name, values in samples_s.items()},
    }
    if "shm" in median_s:
        shm_target = _shm_target_ratio(numel)
        row["shm_us"] = median_s["shm"] * 1e6
        row["shm_mb_per_s"] = payload_bytes / median_s["shm"] / 1e6
        row["shm_vs_tcp"] = _paired_ratio(samples_s["project"], samples_s["shm"])
        row["shm_target_ratio"] = shm_target
        row["shm_verdict"] = _verdict(row["shm_vs_tcp"], shm_target)
    if "raw_snapshot" in median_s:
        row["raw_snapshot_us"] = median_s["raw_snapshot"] * 1e6
        row["ratio_vs_raw_snapshot"] = _paired_ratio(
            samples_s["raw_snapshot"], samples_s["project"]
        )
    return row


def measure_size(hosts: dict[str, ServerHost], numel: int, args: argparse.Namespace) -> list:
    """Push and pull rows for one tensor size, each against a fresh server per kind."""
    project = raw = shm = None
    try:
        project = ProjectClient(hosts["project"].start_server(), numel, "tcp")
        raw = RawClient(hosts["raw"].start_server(), numel)
        shm_address = hosts["project"].start_server().replace("tcp://", "shm://")
        shm = ProjectClient(shm_address, numel, "shm")
        for client in (project, raw, shm):
            _check_roundtrip(client, SERVER_LR)
        iterations = _iterations(numel, args)
        calls = {
            "push": {"project": project.push, "raw": raw.push, "shm": shm.push},
            "pull": {
                "project": project.pull,
                "raw": raw.pull,
                "raw_snapshot": raw.pull_snapshot,
                "shm": shm.pull,
            },
        }
        return [
            _make_row(numel, op, iterations, _measure_op(op_calls, iterations, args.repeats))
            for op, op_calls in calls.items()
        ]
    finally:
        for client in (project, raw, shm):
            if client is not None:
                client.close()


def measure_splits(numel: int, repeats: int) -> dict:
    """In-process timings of the shard-side work a request adds on top of the raw baseline."""
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=SERVER_LR))
    shard.initialize(tensor_specs([("weights", torch.empty(numel))]), [torch.zeros(numel)])
    weights, grads, out = torch.zeros(numel), torch.ones(numel), torch.empty(numel)
    iterations = max(3, 200_000_000 // (4 * numel)) if numel > TINY_NUMEL else 2000
    with cf.ThreadPoolExecutor(max_workers=1) as executor:
        handoff_s = _median_seconds(lambda: executor.submit(int).result(), 2000, repeats)
    timings_s = {
        "shard_snapshot_copy": lambda: shard.read_into([out]),
        "shard_apply_gradient": lambda: shard.apply_gradient([grads]),
        "raw_add": lambda: weights.add_(grads, alpha=-SERVER_LR),
    }
    splits = {
        f"{name}_us": _median_seconds(fn, iterations, repeats) * 1e6
        for name, fn in timings_s.items()
    }
    splits["executor_handoff_us"] = handoff_s * 1e6
    return {"numel": numel, **splits}


# ---------------------------------------------------------------- reporting


def _target(value: float | None) -> str:
    return "" if value is None else f">={value:g}"


def _format_row(row: dict) -> str:
    snapshot = row.get("ratio_vs_raw_snapshot")
    return (
        f"{row['numel']:>10} {row['op']:>5} {row['project_mb_per_s']:>13.1f} "
        f"{row['raw_mb_per_s']:>10.1f} {row['ratio']:>6.2f} {_target(row['target_ratio']):>7} "
        f"{row['verdict'] or '':>6} {row['project_us']:>11.1f} {row['raw_us']:>10.1f} "
        f"{'' if snapshot is None else f'{snapshot:.2f}':>9} "
        f"{row['shm_mb_per_s']:>10.1f} {row['shm_vs_tcp']:>7.2f} "
        f"{_target(row['shm_target_ratio']):>6} {row['shm_verdict'] or '':>6}"
    )


def print_table(rows: list[dict], splits: list[dict]) -> None:
    print(
        f"{'numel':>10} {'op':>5} {'project MB/s':>13} {'raw MB/s':>10} {'ratio':>6} "
        f"{'target':>7} {'':>6} {'project us':>11} {'raw us':>10} {'vs raw+cp':>9} "
        f"{'shm MB/s':>10} {'shm/tcp':>7} {'target':>6} {'':>6}"
    )
    for row in rows:
        print(_format_row(row))
    print("ratio: project over TCP / raw TCP loop; shm/tcp: project over shm / over TCP")
    print("vs raw+cp: project against a raw server that also copies w to a snapshot per pull")
    for split in splits:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items() if k.endswith("_us"))
        print(f"splits at numel {split['numel']}: {parts}")


def save_results(path: Path, args: argparse.Namespace, rows: list, splits: list) -> None:
    record = {
        "benchmark": "wire",
        **machine.environment(),
        "torch_threads_per_process": 1,
        "repeats": args.repeats,
        "server_lr": SERVER_LR,
        "rows": rows,
        "splits": splits,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote {path} (load average {record['load_average_1_5_15_min']})")


def _parse_sizes(text: str) -> list[int]:
    """``"1M,25M,4096"`` -> element counts (K = 1e3, M = 1e6)."""
    scale = {"K": 1_000, "M": 1_000_000}
    sizes = []
    for typed in text.split(","):
        item = typed.strip().upper()
        factor = scale.get(item[-1:], 1)
        number = item[:-1] if factor > 1 else item
        if not number.isdigit() or int(number) < 1:
            raise argparse.ArgumentTypeError(f"bad size {typed.strip()!r} (e.g. 1M,25M)")
        sizes.append(int(number) * factor)
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--sizes", type=_parse_sizes, default=None, help="float32 counts")
    parser.add_argument(
        "--repeats", type=machine.at_least(1), default=None, help="timed repeats per op"
    )
    parser.add_argument(
        "--budget-mb", type=machine.at_least(1), default=None, help="payload MB per repeat"
    )
    parser.add_argument("--tiny-iterations", type=machine.at_least(1), default=None)
    parser.add_argument("--quick", action="store_true", help="a few seconds (smoke test)")
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="JSON path ('-': do not write)"
    )
    args = parser.parse_args(argv)
    quick_defaults = {"sizes": [100_000], "repeats": 3, "budget_mb": 5, "tiny_iterations": 30}
    full_defaults = {
        "sizes": _parse_sizes(DEFAULT_SIZES),
        "repeats": 25,
        "budget_mb": 20,
        "tiny_iterations": 50,
    }
    for key, value in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def _default_out() -> Path:
    day = datetime.date.today().strftime("%Y%m%d")
    return RESULTS_DIR / f"wire_cpu{os.cpu_count()}_{day}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with contextlib.ExitStack() as stack:
        hosts = {
            "project": stack.enter_context(
                ServerHost(start_sgd_shard, SERVER_LR, name="project-host")
            ),
            "raw": stack.enter_context(ServerHost(RawServer, SERVER_LR, name="raw-host")),
        }
        for numel in [TINY_NUMEL, *args.sizes]:
            rows += measure_size(hosts, numel, args)
    splits = [measure_splits(numel, args.repeats) for numel in [TINY_NUMEL, *args.sizes]]
    print_table(rows, splits)
    out = args.out if args.out is not None else (None if args.quick else _default_out())
    if out is not None and str(out) != "-":
        save_results(out, args, rows, splits)
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
