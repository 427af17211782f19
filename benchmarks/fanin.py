"""Fan-in: how a shard holds up as the replicas pushing to it go from a few to thousands, for both
server designs (a serving pool over epoll, and a thread per connection) in the same run.

S shards per design run as ``distbelief ps`` processes (job key on); for each N the load
generator (``fanin_load.py``) drives N replicas of a small model (pull, push, again) against
each design's shards for a fixed time, the designs one after the other per N. Reported per
(design, N): pushes/s per shard, max/min pushes per replica, p50/p99 latency of pushes and
pulls, errors, and each shard's CPU (cores), RSS, threads and descriptors at the end of the
window. Ratios: pushes/s at the largest N over the smallest (target >= 0.8), fairness max/min
(target <= 1.5 at 64, <= 2 at 2000), and pool over threads at each N: medians over
``--repeats`` sweeps, which interleave the designs so that other load hits both alike.

    python benchmarks/fanin.py                                  # N = 8,64,512,2000, 10 s each
    python benchmarks/fanin.py --replicas 8,64 --seconds 3 --out -   # a short smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The repository root: the load generator is imported as ``benchmarks.fanin_load``, the name
# its spawned processes and the fan-in test know it by.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fanin_load, machine

from distbelief.config import SERVER_DESIGNS
from distbelief.wire.security import read_key_file, write_key_file

_RESULTS = Path(__file__).resolve().parent / "results"
_FAIRNESS_TARGETS = {64: 1.5, 2000: 2.0}
_THROUGHPUT_TARGET = 0.8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--replicas", default="8,64,512,2000", help="values of N, comma-separated")
    parser.add_argument(
        "--seconds", type=machine.above_zero, default=10.0, help="measured time per point"
    )
    parser.add_argument("--shards", type=machine.at_least(1), default=1, help="shards per design")
    parser.add_argument("--designs", default=",".join(SERVER_DESIGNS), help="server designs")
    parser.add_argument(
        "--load-processes",
        type=machine.at_least(1),
        default=max(1, (os.cpu_count() or 2) // 2),
        help="processes the replicas are spread over (default: half the cores)",
    )
    parser.add_argument(
        "--repeats", type=machine.at_least(1), default=1, help="sweeps, interleaved"
    )
    parser.add_argument("--model", choices=sorted(fanin_load.MODEL_SHAPES), default="mlp")
    parser.add_argument("--max-connections", type=machine.at_least(1), default=4096)
    parser.add_argument(
        "--out",
        type=machine.out_path,
        help="results stem (default: results/fanin_cpuN_DATE); - skips",
    )
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        args.replica_counts = [int(text) for text in args.replicas.split(",")]
    except ValueError:
        parser.error(f"argument --replicas: expected integers like 8,64, got {args.replicas!r}")
    if min(args.replica_counts) < 1:
        parser.error(f"argument --replicas: each must be >= 1, got {args.replicas!r}")
    args.design_names = [name.strip() for name in args.designs.split(",") if name.strip()]
    unknown = sorted(set(args.design_names) - set(SERVER_DESIGNS))
    if unknown or not args.design_names:
        parser.error(f"argument --designs: choose from {', '.join(SERVER_DESIGNS)}")
    return args


def process_figures(pid: int) -> dict:
    """CPU seconds so far, RSS (MB), threads and open descriptors of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "cpu_s": (int(fields[11]) + int(fields[12])) / ticks,
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def measure_point(design: str, shards, addresses, num_replicas, args, key) -> dict:
    """One (design, N) point: the load's figures and the shards' over the window."""
    samples: dict[str, list[dict]] = {}

    def sample(stage: str) -> None:
        samples[stage] = [process_figures(process.pid) for process in shards]

    result = fanin_load.run_fanin(
        addresses,
        num_replicas,
        args.seconds,
        num_processes=args.load_processes,
        model=args.model,
        auth_key=key,
        on_window=sample,
    )
    pushes = result.pushes
    slowest = min(pushes)
    shard_cores = [
        (end["cpu_s"] - start["cpu_s"]) / args.seconds
        for start, end in zip(samples["start"], samples["end"], strict=True)
    ]
    answered = sum(pushes) * len(shards)  # every replica's push goes to every shard
    return {
        "design": design,
        "replicas": num_replicas,
        "pushes_per_s_per_shard": sum(pushes) / args.seconds,
        "max_min_pushes": max(pushes) / slowest if slowest else None,
        "min_pushes": slowest,
        "max_pushes": max(pushes),
        "push_p50_ms": _ms(fanin_load.percentile(result.push_latency_s, 0.5)),
        "push_p99_ms": _ms(fanin_load.percentile(result.push_latency_s, 0.99)),
        "pull_p50_ms": _ms(fanin_load.percentile(result.pull_latency_s, 0.5)),
        "pull_p99_ms": _ms(fanin_load.percentile(result.pull_latency_s, 0.99)),
        "errors": len(result.errors),
        "first_errors": result.errors[:5],
        "connect_s": result.connect_s,
        "load_cores": result.load_cpu_s / args.seconds,
        "shard_cores": shard_cores,
        "shard_cpu_us_per_push": (
            1e6 * sum(shard_cores) * args.seconds / answered if answered else None
        ),
        "shard_rss_mb": [sample["rss_mb"] for sample in samples["open"]],
        "shard_threads": [sample["threads"] for sample in samples["open"]],
        "shard_fds": [sample["fds"] for sample in samples["open"]],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _number(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "/".join(_number(item, digits) for item in value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def ratio_lines(points: list[dict], designs: list[str], counts: list[int]) -> list[str]:
    """The ratios the targets are about, per design, and pool over threads per N; each figure
    is the median over the repeats."""

    def median(design: str, count: int, key: str) -> float | None:
        # None: max/min of a point where some replica pushed nothing, which is unbounded.
        values = [
            math.inf if p[key] is None else p[key]
            for p in points
            if (p["design"], p["replicas"]) == (design, count)
        ]
        value = statistics.median(values) if values else math.inf
        return None if math.isinf(value) else value

    def rate(design: str, count: int) -> float:
        return median(design, count, "pushes_per_s_per_shard") or 0.0

    lines = []
    low, high = min(counts), max(counts)
    for design in designs:
        # One N only: nothing to compare it with (N over itself would read 1.00, PASS).
        if high > low:
            ratio = rate(design, high) / max(1e-9, rate(design, low))
            verdict = "PASS" if ratio >= _THROUGHPUT_TARGET else "BELOW"
            lines.append(
                f"- {design}: pushes/s per shard at N={high} / at N={low} = {ratio:.2f} "
                f"(target >= {_THROUGHPUT_TARGET}: {verdict})"
            )
        for count, target in _FAIRNESS_TARGETS.items():
            if count in counts:
                fairness = median(design, count, "max_min_pushes")
                # A ceiling: a miss is above it (None: a replica pushed nothing, unbounded).
                verdict = "PASS" if fairness is not None and fairness <= target else "ABOVE"
                lines.append(
                    f"- {design}: max/min pushes per replica at N={count} = "
                    f"{_number(fairness, 2)} (target <= {target}: {verdict})"
                )
    if {"pool", "threads"} <= set(designs):
        for count in sorted(set(counts)):
            if rate("threads", count) == 0:
                lines.append(f"- N={count}: pushes/s pool / threads = - (threads: none)")
                continue
            ratio = rate("pool", count) / rate("threads", count)
            lines.append(f"- N={count}: pushes/s pool / threads = {ratio:.2f}")
    return lines


_HEADER = [
    "design",
    "N",
    "pushes/s per shard",
    "max/min pushes",
    "push p50/p99 ms",
    "pull p50/p99 ms",
    "errors",
    "shard cores",
    "shard CPU us/push",
    "shard RSS MB",
    "shard threads",
    "shard fds",
    "load cores",
]


def _row(point: dict) -> list[str]:
    return [
        point["design"],
        str(point["replicas"]),
        _number(point["pushes_per_s_per_shard"], 0),
        _number(point["max_min_pushes"], 2),
        f"{_number(point['push_p50_ms'])}/{_number(point['push_p99_ms'])}",
        f"{_number(point['pull_p50_ms'])}/{_number(point['pull_p99_ms'])}",
        str(point["errors"]),
        _number(point["shard_cores"], 2),
        _number(point["shard_cpu_us_per_push"], 0),
        _number(point["shard_rss_mb"], 0),
        _number(point["shard_threads"]),
        _number(point["shard_fds"]),
        _number(point["load_cores"], 2),
    ]


def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as folder:
        key_file = write_key_file(Path(folder) / "job.key")
        key = read_key_file(key_file)
        started = {}
        try:
            for design in args.design_names:
                flags = ["--server-design", design, "--max-connections", str(args.max_connections)]
                started[design] = fanin_load.start_shards(args.shards, key_file, *flags)
                fanin_load.initialise_shards(started[design][1], args.model, key)
            points = []
            for repeat in range(args.repeats):
                for count in args.replica_counts:
                    for design in args.design_names:  # interleaved: load changes hit both
                        shards, addresses = started[design]
                        point = measure_point(design, shards, addresses, count, args, key)
                        points.append({**point, "repeat": repeat})
                        print(" | ".join(_row(point)), flush=True)
                        time.sleep(1.0)  # the shard drops the last point's connections
        finally:
            for shards, _ in started.values():
                fanin_load.stop_shards(shards)
    # --out is a Path: the record keeps it as typed.
    arguments = vars(args) | {"out": args.out and str(args.out)}
    record = {**machine.environment(), "args": arguments, "points": points}
    lines = ratio_lines(points, args.design_names, args.replica_counts)
    description = "\n".join(
        [
            f"{args.shards} shard(s) per design, model {args.model}, {args.seconds:g} s per "
            f"point, {args.load_processes} load process(es), all on this machine. Per shard: "
            "cores = its CPU seconds per second of the window (CPU us/push: all shards' CPU "
            "over the pushes each of them answered, its pull included); RSS, threads and open "
            "descriptors at the end of the window, the replicas still connected.",
            "",
            *lines,
        ]
    )
    stem = args.out or _RESULTS / f"fanin_cpu{os.cpu_count()}_{time.strftime('%Y%m%d')}"
    cells = [_row(point) for point in points]
    return machine.write_report(
        stem, record, "Fan-in: replicas per shard", description, _HEADER, cells
    )


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (timeout's) unwinds as Ctrl-C does: the processes are stopped and the folder
    # holding the job's key is removed, not left behind.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    print(run(_parse(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
