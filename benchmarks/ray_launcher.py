"""The Ray engine against the local launcher on one machine, in one invocation: the same job
(LeNet on digits, 2 shards x 2 workers by default) launched with ``--cluster local`` and with
``--cluster ray`` (the embedded Ray instance), interleaved; launch to the first worker step, the
workers' steps/s, the CPU time per step and launch to exit, each as a ratio Ray / local per
repeat (median reported).

Ray only places the processes (the data goes on the project's wire either way), so steps/s
should match: target >= 0.95. Start-up is reported, not held to a target: Ray starts an
instance and one fresh interpreter per actor, where the local launcher forks from a warm
forkserver.

Owns the timings and the md/json report. The first step's time is read from the run itself:
the launch-to-first-row wall time of metrics.csv minus that row's ``time_s`` (seconds since the
first worker started training), polled every 10 ms. Steps/s is the job's in its steady state
(see ``steady_window``), summed over the workers. On a machine shared with other work, which
engine's processes get more of the CPUs varies from run to run; the CPU time the shards and
workers spend per step (read from /proc every 0.2 s) does not: it says what each engine's
processes cost.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
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
CPU_POLL_S = 0.2
"""How often the shards' and workers' CPU times are read while a job trains."""
STEPS_PER_S_TARGET = 0.95
"""Ray's steps/s as a fraction of the local launcher's: at least this."""


def _rows(metrics: Path, role: str) -> list[dict]:
    if not metrics.is_file():
        return []
    try:
        return [row for row in read_metrics(metrics) if row["role"] == role]
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


class TooShort(ValueError):
    """A job too short to leave a steady state to time (its --steps)."""


def steady_window(rows: list[dict], evaluations: list[dict]) -> tuple[float, float, float]:
    """The job's steady state ``(start, end, steps)`` in the metrics' time: from the moment
    every worker trains and the evaluator has evaluated once (each engine's start-up left
    behind: the local launcher forks the evaluator warm, a Ray actor imports torch first,
    beside the training workers) to the first worker's last metric row; and the steps all
    workers made in it."""
    by_rank: dict[int, list[dict]] = {}
    for row in rows:
        by_rank.setdefault(row["rank"], []).append(row)
    start = max(worker_rows[0]["time_s"] for worker_rows in by_rank.values())
    if evaluations:
        start = max(start, evaluations[0]["time_s"])
    end = min(worker_rows[-1]["time_s"] for worker_rows in by_rank.values())
    if end - start < 1.0:
        raise TooShort("less than 1 s of steady training: use more --steps")
    steps = sum(_step_at(r, end) - _step_at(r, start) for r in by_rank.values())
    return start, end, steps


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sample_cpu(run_dir: Path, samples: dict[str, list[tuple[float, float]]]) -> None:
    """Appends ``(wall time, CPU seconds)`` of each shard and worker in pids.json."""
    try:
        pids = json.loads((run_dir / "pids.json").read_text())
    except (OSError, ValueError):
        return
    now = time.time()
    for name, pid in pids.items():
        if name.startswith(("shard", "worker")) and (cpu := _cpu_s(pid)) is not None:
            samples.setdefault(name, []).append((now, cpu))


def _cpu_at(samples: list[tuple[float, float]], wall: float) -> float:
    """A process's CPU seconds at ``wall``, interpolated; its last reading after it (a worker
    exits right after its last step)."""
    if wall < samples[0][0]:
        raise ValueError("no CPU reading before the steady window: polled too late")
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t0 <= wall <= t1:
            return c0 + (c1 - c0) * ((wall - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return samples[-1][1]


def run_job(engine: str, job_args: list[str], run_dir: Path) -> dict:
    """Launches one job on ``engine``; returns launch to first step, steady steps/s, the CPU
    time its shards and workers spent per step then (what the processes cost, whatever share
    of the machine they got), launch to exit.

    Raises:
        TimeoutError: no worker row, or no end, within RUN_TIMEOUT_S.
        RuntimeError: the job failed.
    """
    log = run_dir.with_suffix(".log")
    samples: dict[str, list[tuple[float, float]]] = {}
    started = time.time()
    with log.open("w") as log_file:  # a file: a full pipe would stall the launcher
        process = subprocess.Popen(
            [*CLI, "train", "--cluster", engine, *job_args, "--out", str(run_dir)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (rows := _rows(run_dir / "metrics.csv", "worker")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"no worker row in {run_dir / 'metrics.csv'}")
            # From the processes' start: the steady window may begin before the first row.
            _sample_cpu(run_dir, samples)
            time.sleep(POLL_S)
        train_start = time.time() - rows[0]["time_s"]
        first_step_s = train_start - started
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"distbelief train --cluster {engine} did not end")
            _sample_cpu(run_dir, samples)
            time.sleep(CPU_POLL_S)
        if process.returncode != 0:
            raise RuntimeError(f"distbelief train --cluster {engine} failed: {log.read_text()}")
        job_s = time.time() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    metrics = run_dir / "metrics.csv"
    start, end, steps = steady_window(_rows(metrics, "worker"), _rows(metrics, "evaluator"))
    cpu = sum(
        _cpu_at(s, train_start + end) - _cpu_at(s, train_start + start) for s in samples.values()
    )
    return {
        "first_step_s": first_step_s,
        "steps_per_s": steps / (end - start),
        "cpu_ms_per_step": 1000 * cpu / steps,
        "job_s": job_s,
    }


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
    keys = ("first_step_s", "steps_per_s", "cpu_ms_per_step", "job_s")
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
        "steps_per_s": ("steps/s, steady state", f">= {STEPS_PER_S_TARGET:g}"),
        "cpu_ms_per_step": ("CPU ms per step of shards + workers, steady state", "-"),
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=machine.at_least(1), default=3)
    parser.add_argument("--steps", type=machine.at_least(1), default=1500, help="steps per worker")
    parser.add_argument("--workers", type=machine.at_least(1), default=2)
    parser.add_argument("--shards", type=machine.at_least(1), default=2)
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="file stem; - writes nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        date = datetime.date.today().strftime("%Y%m%d")
        args.out = RESULTS_DIR / f"ray_launcher_cpu{os.cpu_count()}_{date}"
    job_args = ["--steps", str(args.steps), "--workers", str(args.workers)]
    job_args += ["--shards", str(args.shards)]
    with tempfile.TemporaryDirectory() as runs_dir:
        try:
            runs = measure(args.repeats, job_args, Path(runs_dir))
        except TooShort as e:
            parser.error(f"--steps {args.steps}: {e}")
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
    sys.exit(machine.run_main(main))
