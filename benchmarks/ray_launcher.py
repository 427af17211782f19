"""The Ray engine against the local launcher on one machine, in one invocation: the same job
(LeNet on digits, 2 shards x 2 workers by default) launched with ``--cluster local`` and with
``--cluster ray`` (the embedded Ray instance), interleaved; launch to the first worker step, the
workers' steps/s and launch to exit, each as a ratio Ray / local per repeat (median reported).

Ray only places the processes (the data goes on the project's wire either way), so steps/s
should match: target >= 0.95. Start-up is reported, not held to a target: Ray starts an
instance and one fresh interpreter per actor, where the local launcher forks from a warm
forkserver.

Owns the timings and the md/json report. The first step's time is read from the run itself:
the launch-to-first-row wall time of metrics.csv minus that row's ``time_s`` (seconds since the
first worker started training), polled every 10 ms. Steps/s is the job's while every worker
trains (from the last worker's first metric row to the first worker's last one), summed over
the workers.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine
from distbelief.telemetry import read_metrics

logger = logging.getLogger("ray_launcher")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLI = [sys.executable, "-m", "distbelief"]
ENGINES = ("local", "ray")
RUN_TIMEOUT_S = 400.0
"""Longest one job may take before it is stopped as hung."""
POLL_S = 0.01
STEPS_PER_S_TARGET = 0.95
"""Ray's steps/s as a fraction of the local launcher's: at least this."""


def _worker_rows(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    try:
        return [row for row in read_metrics(metrics) if row["role"] == "worker"]
    except ValueError:  # the header or a row is being written right now
        return []


def _step_at(rows: list[dict], time_s: float) -> float:
    """A worker's step at ``time_s``, interpolated between its metric rows."""
    for before, after in itertools.pairwise(rows):
        if before["time_s"] <= time_s <= after["time_s"]:
            span = after["time_s"] - before["time_s"]
            fraction = (time_s - before["time_s"]) / span if span > 0 else 1.0
            return before["step"] + fraction * (after["step"] - before["step"])
    return rows[-1]["step"] if time_s >= rows[-1]["time_s"] else rows[0]["step"]


def steps_per_s(rows: list[dict]) -> float:
    """The job's steps/s while every worker trains: the steps all workers made between the
    last one's first metric row and the first one's last row, over that time (a worker
    that starts early or ends late trains alone for a while, faster: left out)."""
    by_rank: dict[int, list[dict]] = {}
    for row in rows:
        by_rank.setdefault(row["rank"], []).append(row)
    start = max(worker_rows[0]["time_s"] for worker_rows in by_rank.values())
    end = min(worker_rows[-1]["time_s"] for worker_rows in by_rank.values())
    if end <= start:
        raise ValueError("the workers never trained at the same time: use more --steps")
    steps = sum(_step_at(r, end) - _step_at(r, start) for r in by_rank.values())
    return steps / (end - start)


def run_job(engine: str, job_args: list[str], run_dir: Path) -> dict:
    """Launches one job on ``engine``; returns launch to first step, steps/s, launch to exit.

    Raises:
        TimeoutError: no worker row, or no end, within RUN_TIMEOUT_S.
        RuntimeError: the job failed.
    """
    started = time.time()
    process = subprocess.Popen(
        [*CLI, "train", "--cluster", engine, *job_args, "--out", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (rows := _worker_rows(run_dir / "metrics.csv")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"no worker row in {run_dir / 'metrics.csv'}")
            time.sleep(POLL_S)
        first_step_s = time.time() - rows[0]["time_s"] - started
        _, err = process.communicate(timeout=RUN_TIMEOUT_S)
        if process.returncode != 0:
            raise RuntimeError(f"distbelief train --cluster {engine} failed: {err[-2000:]}")
        job_s = time.time() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    rate = steps_per_s(_worker_rows(run_dir / "metrics.csv"))
    return {"first_step_s": first_step_s, "steps_per_s": rate, "job_s": job_s}


def measure(repeats: int, job_args: list[str], runs_dir: Path) -> dict[str, list[dict]]:
    """Each engine's job ``repeats`` times, interleaved (which goes first alternates)."""
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for repeat in range(repeats):
        order = ENGINES if repeat % 2 == 0 else ENGINES[::-1]
        for engine in order:
            run = run_job(engine, job_args, runs_dir / f"{engine}{repeat}")
            runs[engine].append(run)
            rounded = {key: round(value, 2) for key, value in run.items()}
            logger.info("repeat %d %s: %s", repeat, engine, rounded)
    return runs


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians per engine and the median of the per-repeat ratios Ray / local."""
    keys = ("first_step_s", "steps_per_s", "job_s")
    summary: dict = {"median": {}, "ratio_ray_over_local": {}}
    for engine in ENGINES:
        summary["median"][engine] = {
            key: round(statistics.median(run[key] for run in runs[engine]), 3) for key in keys
        }
    for key in keys:
        pairs = zip(runs["ray"], runs["local"], strict=True)
        ratios = [ray[key] / local[key] for ray, local in pairs]
        summary["ratio_ray_over_local"][key] = {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        }
    summary["steps_per_s_target"] = STEPS_PER_S_TARGET
    return summary


def table(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["what", "local (median)", "ray (median)", "ray / local: median", "range", "target"]
    labels = {
        "first_step_s": ("launch to first step (s)", "-"),
        "steps_per_s": ("steps/s, all workers training", f">= {STEPS_PER_S_TARGET:g}"),
        "job_s": ("launch to exit (s)", "-"),
    }
    cells = []
    for key, (label, target) in labels.items():
        ratio = summary["ratio_ray_over_local"][key]
        cells.append(
            [
                label,
                f"{summary['median']['local'][key]:.2f}",
                f"{summary['median']['ray'][key]:.2f}",
                f"{ratio['median']:.2f}",
                f"{ratio['min']:.2f}-{ratio['max']:.2f}",
                target,
            ]
        )
    return header, cells


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="steps per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="file stem; - writes nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.out is None:
        date = datetime.date.today().strftime("%Y%m%d")
        args.out = RESULTS_DIR / f"ray_launcher_cpu{os.cpu_count()}_{date}"
    job_args = ["--steps", str(args.steps), "--workers", str(args.workers)]
    job_args += ["--shards", str(args.shards)]
    with tempfile.TemporaryDirectory() as runs_dir:
        runs = measure(args.repeats, job_args, Path(runs_dir))
    summary = summarize(runs)
    record = {"benchmark": "ray_launcher", **machine.environment()}
    record |= {"settings": {"repeats": args.repeats, "job_args": job_args}}
    record |= {"summary": summary, "runs": runs}
    description = (
        f"Medians of {args.repeats} interleaved repeats of `distbelief train "
        f"{' '.join(job_args)}` with `--cluster local` and `--cluster ray` (the embedded Ray "
        "instance); ratios are Ray / local per repeat."
    )
    title = "The Ray engine against the local launcher, one machine"
    print(machine.write_report(args.out, record, title, description, *table(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
