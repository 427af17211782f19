"""Throughput scaling of Downpour SGD: workers {1, 2, 4} x shards {1, 2}, LeNet on digits, a fixed
number of steps per worker, in one invocation.

Owns the grid, the throughput and wire-rate figures read back from each run's metrics.csv, and
the md/json/png report. Training is the library launcher's (``train``); evaluation runs only once,
after the workers finish, so it takes no CPU from them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import machine
from distbelief.config import FLAT_FIELDS, JobConfig
from distbelief.errors import LauncherInterrupted
from distbelief.files import write_file_atomic
from distbelief.launch import train
from distbelief.telemetry import read_metrics

logger = logging.getLogger("scaling")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_WORKERS = (1, 2, 4)
DEFAULT_SHARDS = (1, 2)
BASE = {"model": "lenet", "dataset": "digits", "lr": 0.05, "server_lr": 0.05, "batch_size": 32}
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
DPI = 110


# ---------------------------------------------------------------- one run and its figures


def worker_series(records: list[dict]) -> dict[int, list[dict]]:
    """Each worker's rows in time order."""
    by_rank: dict[int, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["time_s"]):
        if record["role"] == "worker" and record["step"] is not None:
            by_rank.setdefault(record["rank"], []).append(record)
    return by_rank


def throughput(records: list[dict], batch_size: int) -> dict:
    """Samples/s and wire bytes/s from a run's worker rows (one row every log_every_steps).

    - ``sum_of_workers``: the sum over workers of (its steps x batch) / (its own training
      time, first to last row): the brief's aggregate; it overstates a job whose workers do
      not all train at the same time.
    - ``job``: every worker's samples / (first row of any worker to last row of any worker).
    - ``overlap``: the share of the job's span during which every worker was training.
    """
    by_rank = worker_series(records)
    rates, bytes_total, samples_total = [], 0, 0
    for rows in by_rank.values():
        steps = rows[-1]["step"] - rows[0]["step"]
        span_s = rows[-1]["time_s"] - rows[0]["time_s"]
        rates.append(steps * batch_size / span_s if span_s > 0 else 0.0)
        samples_total += steps * batch_size
        # The first row's window holds the start-up pull; rows after it hold steady work.
        bytes_total += sum((r["bytes_pushed"] or 0) + (r["bytes_pulled"] or 0) for r in rows[1:])
    first_s = min(rows[0]["time_s"] for rows in by_rank.values())
    last_s = max(rows[-1]["time_s"] for rows in by_rank.values())
    both_s = min(rows[-1]["time_s"] for rows in by_rank.values()) - max(
        rows[0]["time_s"] for rows in by_rank.values()
    )
    job_s = last_s - first_s
    return {
        "sum_of_workers_samples_per_s": sum(rates),
        "per_worker_samples_per_s": rates,
        "job_samples_per_s": samples_total / job_s if job_s > 0 else None,
        "job_wire_bytes_per_s": bytes_total / job_s if job_s > 0 else None,
        "wire_bytes_per_sample": bytes_total / samples_total if samples_total else None,
        "overlap": max(0.0, both_s) / job_s if job_s > 0 else None,
        "train_s": job_s,
    }


def run_cell(num_workers: int, num_shards: int, args, runs_dir: Path, repeat: int) -> dict:
    """One training job of the grid, summarised; a failed job becomes a row with its error."""
    name = f"w{num_workers}_s{num_shards}_r{repeat}"
    # BASE keeps the config's flat names (FLAT_FIELDS): the result files record it so.
    config = JobConfig.from_fields(
        {FLAT_FIELDS[key]: value for key, value in BASE.items()}
        | {
            "cluster.num_workers": num_workers,
            "cluster.num_shards": num_shards,
            "optimizer.steps": args.steps,
            "model.seed": args.seed,
            "reporting.eval_during_training": False,
            "reporting.out_dir": str(runs_dir / name),
        }
    )
    row: dict = {"workers": num_workers, "shards": num_shards, "repeat": repeat}
    logger.info("run %s", name)
    started = time.monotonic()
    try:
        result = train(config)
    except LauncherInterrupted:
        raise
    except Exception as e:  # one failed job must not lose the others' results
        logger.error("run %s failed: %s", name, e)
        return {**row, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"}
    records = read_metrics(result.run_dir / "metrics.csv")
    row |= throughput(records, config.optimizer.minibatch_size)
    row |= {"wall_s": time.monotonic() - started, "final_acc": result.final.get("test_accuracy")}
    logger.info(
        "run %s: %.0f samples/s (sum of workers), %.0f (job), %.1f MB/s wire",
        name,
        row["sum_of_workers_samples_per_s"],
        row["job_samples_per_s"] or 0.0,
        (row["job_wire_bytes_per_s"] or 0.0) / 1e6,
    )
    return row


def run_grid(args, runs_dir: Path) -> list[dict]:
    """Every cell ``args.repeats`` times; a repeat runs every cell once, in grid order."""
    return [
        run_cell(workers, shards, args, runs_dir, repeat)
        for repeat in range(args.repeats)
        for workers in args.workers
        for shards in args.shards
    ]


# ---------------------------------------------------------------- summary and report


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (workers, shards): medians over repeats, and speed-ups (ratios of the
    medians) against the smallest job, 1 worker and 1 shard."""
    keys = dict.fromkeys((r["workers"], r["shards"]) for r in rows)
    lines = []
    for workers, shards in keys:
        group = [r for r in rows if (r["workers"], r["shards"]) == (workers, shards)]
        good = [r for r in group if "error" not in r]
        line = {"workers": workers, "shards": shards, "runs": len(group)}
        line["errors"] = [r["error"] for r in group if "error" in r]
        for key in (
            "sum_of_workers_samples_per_s",
            "job_samples_per_s",
            "job_wire_bytes_per_s",
            "wire_bytes_per_sample",
            "overlap",
            "train_s",
        ):
            values = [r[key] for r in good if r.get(key) is not None]
            line[key] = statistics.median(values) if values else None
        lines.append(line)
    for line in lines:
        base = next((b for b in lines if (b["workers"], b["shards"]) == (1, 1)), None)
        for key in ("sum_of_workers_samples_per_s", "job_samples_per_s"):
            speedup = None
            if base and base[key] and line[key] is not None:
                speedup = line[key] / base[key]
            line[key.replace("samples_per_s", "speedup")] = speedup
    return lines


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def table(lines: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "workers",
        "shards",
        "busy processes",
        "samples/s, sum of workers",
        "x (1 worker, 1 shard)",
        "samples/s, job",
        "x (1 worker, 1 shard), job",
        "wire MB/s",
        "wire KB/sample",
        "all workers training (% of span)",
        "training span (s)",
    ]
    cells = [
        [
            str(line["workers"]) + (f" ({len(line['errors'])} failed)" if line["errors"] else ""),
            str(line["shards"]),
            _busy(line["workers"] + line["shards"]),
            _fmt(line["sum_of_workers_samples_per_s"], "{:.0f}"),
            _fmt(line["sum_of_workers_speedup"], "{:.2f}"),
            _fmt(line["job_samples_per_s"], "{:.0f}"),
            _fmt(line["job_speedup"], "{:.2f}"),
            _fmt(_scaled(line["job_wire_bytes_per_s"], 1e-6), "{:.1f}"),
            _fmt(_scaled(line["wire_bytes_per_sample"], 1e-3), "{:.1f}"),
            _fmt(_scaled(line["overlap"], 100.0), "{:.0f}"),
            _fmt(line["train_s"], "{:.2f}"),
        ]
        for line in lines
    ]
    return header, cells


def _busy(num_processes: int) -> str:
    cores = os.cpu_count() or 1
    return f"{num_processes} (> {cores} cores)" if num_processes > cores else str(num_processes)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def write_report(stem: Path, record: dict, header: list[str], cells: list[list[str]]) -> str:
    """``<stem>.json`` and ``<stem>.md`` (unless stem is "-"); returns the markdown."""
    settings = record["settings"]
    description = (
        f"{settings['steps']} steps per worker, batch {settings['batch_size']}, n_push = n_pull = "
        f"1, 1 thread per worker, evaluation only after training; {settings['repeats']} "
        "repeat(s), medians. Busy processes = workers + shards (the launcher and the idle "
        f"evaluator add a little); with {record['cpu_count']} cores, more busy processes than "
        "cores take turns on them, so they can add no compute."
    )
    return machine.write_report(
        stem, record, "Downpour throughput scaling: LeNet on digits", description, header, cells
    )


def plot(lines: list[dict], path: Path, title: str) -> None:
    """Samples/s (left) and wire MB/s (right) vs workers, one line per shard count."""
    figure = Figure(figsize=(12.0, 4.8), dpi=DPI)
    FigureCanvasAgg(figure)
    rate_axes, wire_axes = figure.subplots(1, 2)
    shard_counts = sorted({line["shards"] for line in lines})
    for color, shards in zip(COLORS, shard_counts, strict=False):
        own = sorted((ln for ln in lines if ln["shards"] == shards), key=lambda ln: ln["workers"])
        workers = [ln["workers"] for ln in own]
        label = f"{shards} shard{'s' if shards > 1 else ''}"
        for key, kind, style in (
            ("sum_of_workers_samples_per_s", "sum of workers", ("-", "o")),
            ("job_samples_per_s", "job (first to last row)", ("--", "s")),
        ):
            _line(rate_axes, workers, [ln[key] for ln in own], color, f"{label}: {kind}", *style)
        wire = [_scaled(ln["job_wire_bytes_per_s"], 1e-6) for ln in own]
        _line(wire_axes, workers, wire, color, label, "-", "o")
    _core_bound(rate_axes, lines)
    rate_axes.set_ylabel("training samples/s, all workers")
    wire_axes.set_ylabel("wire MB/s (pushed + pulled), all workers")
    for axes in (rate_axes, wire_axes):
        axes.set_xlabel("workers")
        axes.set_xticks(sorted({line["workers"] for line in lines}))
        axes.set_ylim(bottom=0.0)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right", fontsize="small")
    figure.suptitle(title, fontsize=12)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    logger.info("wrote %s", path)


def _core_bound(axes, lines: list[dict]) -> None:
    """A dotted line at cores x the 1-worker, 1-shard rate: all cores computing, no overhead."""
    base = next((ln for ln in lines if (ln["workers"], ln["shards"]) == (1, 1)), None)
    cores = os.cpu_count() or 1
    if base and base["sum_of_workers_samples_per_s"]:
        bound = cores * base["sum_of_workers_samples_per_s"]
        axes.set_ylim(top=1.12 * bound)
        axes.axhline(
            bound,
            color="0.4",
            linestyle=":",
            label=f"{cores} x (1 worker, 1 shard): all {cores} cores computing",
        )


def _line(axes, xs, ys, color, label, linestyle, marker) -> None:
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if points:
        axes.plot(
            *zip(*points, strict=True),
            color=color,
            linestyle=linestyle,
            marker=marker,
            linewidth=1.8,
            label=label,
        )


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--workers", type=_int_list, default=list(DEFAULT_WORKERS))
    parser.add_argument("--shards", type=_int_list, default=list(DEFAULT_SHARDS))
    parser.add_argument(
        "--steps", type=machine.at_least(20), default=None, help="per worker (default 400)"
    )
    parser.add_argument(
        "--repeats", type=machine.at_least(1), default=None, help="default 2 (--quick: 1)"
    )
    parser.add_argument("--seed", type=machine.seed, default=0)
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="file stem; - writes nothing"
    )
    parser.add_argument("--runs-dir", type=Path, default=None, help="run folders (default tmp)")
    parser.add_argument("--quick", action="store_true", help="workers 1,2, 60 steps; no results")
    parser.add_argument(
        "--replot",
        type=machine.record_file("scaling"),
        default=None,
        help="redraw the PNG of a JSON",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.workers = [w for w in args.workers if w <= 2] or [1]
    if args.steps is None:
        args.steps = 60 if args.quick else 400
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.out is None:
        date = datetime.date.today().strftime("%Y%m%d")
        stem = RESULTS_DIR / f"scaling_cpu{os.cpu_count()}_{date}"
        args.out = Path("-") if args.quick else stem
    return args


def plot_title(record: dict) -> str:
    steps, cpus = record["settings"]["steps"], record["cpu_count"]
    return f"Downpour throughput: LeNet on digits, {steps} steps per worker, {cpus} CPUs"


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_system_exit)  # unwind: the launcher stops its children
    args = parse_args(argv)
    if args.replot is not None:
        record = json.loads(args.replot.read_text())
        plot(record["summary"], args.replot.with_suffix(".png"), plot_title(record))
        return 0
    with contextlib.ExitStack() as stack:
        runs_dir = args.runs_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        rows = run_grid(args, runs_dir)
    lines = summarize(rows)
    settings = {**BASE, "steps": args.steps, "seed": args.seed, "repeats": args.repeats}
    settings |= {"workers": args.workers, "shards": args.shards}
    record = {"benchmark": "scaling", **machine.environment(), "settings": settings}
    record |= {"summary": lines, "runs": rows}
    print(write_report(args.out, record, *table(lines)))
    if str(args.out) != "-":
        plot(lines, args.out.with_suffix(".png"), plot_title(record))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
