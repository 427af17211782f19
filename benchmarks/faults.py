"""Fault tolerance: one `distbelief train` job whose processes are SIGKILLed on a schedule tied
to training progress, next to the same job left alone, in one invocation.

Owns the kill schedule, the comparison of the two runs, their plot and their md/json table.
Training, checkpoints and restarts are the launcher's: this script only starts the CLI as a
subprocess, reads its run folder (pids.json, metrics.csv, summary.json) and sends signals. It
binds nothing and kills only the launcher's own processes (their PID's ancestry is checked).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

import machine
from distbelief.files import write_file_atomic, write_text_atomic
from distbelief.telemetry import read_metrics

logger = logging.getLogger("faults")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SCHEDULE = "worker1,shard0,worker0,shard1"
QUICK_SCHEDULE = "worker1,shard0"
POLL_S = 0.1
"""How often the driver reads metrics.csv for progress."""
STOP_GRACE_S = 60.0
"""Time the launcher gets after SIGTERM to stop its children before it is SIGKILLed (it gives
each child in turn up to 5 s to stop, then 5 s more after a terminate)."""
DPI = 110
ACCURACY_AXIS_FROM = 0.9
EVAL_GAP_FACTOR = 4
"""A break in the accuracy line where evaluations are this many periods apart."""
SHARD_OUTAGE_WINDOW_S = 30.0
"""After a shard's death, the longest pause of the workers within this window is its outage."""
COLORS = {"faults": "tab:blue", "baseline": "0.45"}
LABELS = {"faults": "with kills", "baseline": "undisturbed"}


# ---------------------------------------------------------------- the launcher subprocess


def train_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The `distbelief train` command line of one run (both runs use the same one)."""
    flags = {"workers": args.workers, "shards": args.shards, "steps": args.steps}
    flags |= {"checkpoint-every": args.checkpoint_every_s, "eval-every": args.eval_every_s}
    flags |= {"max-restarts": args.max_restarts, "seed": args.seed, "out": run_dir}
    return [sys.executable, "-m", "distbelief", "train", *(f"--{k}={v}" for k, v in flags.items())]


def _parent_pid(pid: int) -> int | None:
    """The parent PID of ``pid`` from /proc (None when it is gone or unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is the parent of ``pid``, or its parent's parent (the launcher starts
    its processes through a forkserver of its own)."""
    parent = _parent_pid(pid)
    return parent == ancestor or (parent is not None and _parent_pid(parent) == ancestor)


def read_pids(run_dir: Path) -> dict[str, int]:
    """pids.json of a running job ({} until the launcher has written it)."""
    try:
        return json.loads((run_dir / "pids.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class LauncherJob:
    """One `distbelief train` subprocess; leaving the context stops it and its children."""

    def __init__(self, command: list[str], run_dir: Path, log_path: Path) -> None:
        self.command = command
        self.run_dir = run_dir
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.started_s = 0.0

    def __enter__(self) -> LauncherJob:
        self.started_s = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def own_children(self) -> dict[str, int]:
        """pids.json entries that are still processes of this launcher."""
        return {n: p for n, p in read_pids(self.run_dir).items() if _descends_from(p, self.pid)}

    def stop(self) -> None:
        """SIGTERM (the launcher then stops its children), wait, then SIGKILL everything."""
        if self.process is None or self.process.poll() is not None:
            return
        children = self.own_children()
        self.process.send_signal(signal.SIGTERM)
        sent_s = time.monotonic()
        try:
            self.process.wait(timeout=STOP_GRACE_S)
            logger.info("launcher stopped %.1fs after SIGTERM", time.monotonic() - sent_s)
            return
        except subprocess.TimeoutExpired:
            logger.warning("launcher %d ignored SIGTERM for %gs", self.pid, STOP_GRACE_S)
        for name, pid in children.items():
            if _descends_from(pid, self.pid):
                logger.warning("killing %s (pid %d)", name, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait()

    def log_tail(self, num_lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])


# ---------------------------------------------------------------- driving the kills


class ProgressReader:
    """Reads a running job's metrics.csv: workers' progress, and where "now" is on its time axis.

    Rows carry ``time_s`` = (child's clock when it wrote) - (training start), so every read
    gives ``time.time() - max(time_s)`` >= the training start, ``time.time()`` taken once the
    read is done (one taken before would miss the rows written while the file was read, and
    place the start early by as long as the read took); the least of these over many reads
    estimates the start to within the launcher's fastest routing of a row.
    """

    def __init__(self, run_dir: Path, total_steps: int) -> None:
        self.path = run_dir / "metrics.csv"
        self.total_steps = total_steps
        self.train_start_s: float | None = None
        """Estimated wall-clock (time.time()) start of training."""
        self.last_progress = 0.0

    def progress(self) -> float:
        """Fraction of all workers' steps done, from the latest worker rows."""
        try:
            rows = read_metrics(self.path)
        except ValueError:  # not written yet, or a row caught half-written
            return 0.0
        now_s = time.time()  # after the read: no row it returned was written later
        latest: dict[int, int] = {}
        for row in rows:
            if row["role"] == "worker" and row["step"] is not None:
                latest[row["rank"]] = max(latest.get(row["rank"], 0), row["step"])
        if rows:
            start_s = now_s - max(row["time_s"] for row in rows)
            self.train_start_s = min(start_s, self.train_start_s or start_s)
        self.last_progress = sum(latest.values()) / self.total_steps
        return self.last_progress

    def axis_time_s(self, wall_s: float) -> float | None:
        """``wall_s`` (a time.time()) on the metrics time axis (None before any row)."""
        return None if self.train_start_s is None else wall_s - self.train_start_s


def kill_fractions(num_kills: int) -> list[float]:
    """Progress at which each kill fires: evenly spaced, e.g. 20/40/60/80% for four."""
    return [(i + 1) / (num_kills + 1) for i in range(num_kills)]


def try_kill(job: LauncherJob, name: str, killed: dict[str, int]) -> tuple[int, float] | None:
    """SIGKILL the current process ``name`` of the job: its PID and the time.time() the signal
    was sent (read just before: the launcher may see the death before this process runs
    again); None if it is not (yet) there.

    A process killed before must have been restarted (a new PID in pids.json) first.
    """
    pid = read_pids(job.run_dir).get(name)
    if pid is None or pid == killed.get(name) or not _descends_from(pid, job.pid):
        return None
    sent_s = time.time()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # died by itself since the check; the launcher handles it
        return None
    killed[name] = pid
    return pid, sent_s


def drive(job: LauncherJob, schedule: Sequence[str], total_steps: int, timeout_s: float) -> list:
    """Wait for the job to end, killing ``schedule`` at evenly spaced progress points.

    Returns:
        One dict per kill sent: process, pid, progress at the kill, and ``time_s``, its time
        on the metrics time axis (estimated; see ``ProgressReader``).

    Raises:
        TimeoutError: the job ran longer than ``timeout_s``.
    """
    fractions = kill_fractions(len(schedule))
    reader = ProgressReader(job.run_dir, total_steps)
    kills: list[dict] = []
    killed: dict[str, int] = {}
    while job.process.poll() is None:
        if time.monotonic() - job.started_s > timeout_s:
            raise TimeoutError(f"job in {job.run_dir} still running after {timeout_s:g}s")
        # Reads stop after the last kill: the job needs the 2 cores more than we do.
        if len(kills) < len(schedule) and reader.progress() >= fractions[len(kills)]:
            name, progress = schedule[len(kills)], reader.last_progress
            if sent := try_kill(job, name, killed):
                pid, sent_s = sent
                kills.append({"process": name, "pid": pid, "progress": progress, "wall_s": sent_s})
                logger.info("killed %s (pid %d) at %.0f%% of the steps", name, pid, 100 * progress)
        time.sleep(POLL_S)
    for kill in kills:
        kill["time_s"] = reader.axis_time_s(kill.pop("wall_s"))
    return kills


def run_job(args: argparse.Namespace, runs_dir: Path, label: str, schedule: Sequence[str]) -> dict:
    """Run one job to its end (killing ``schedule``) and summarise it.

    Raises:
        RuntimeError: the launcher exited with an error (the message holds its log's tail).
        TimeoutError: the job overran ``--timeout``; it is stopped first.
    """
    run_dir = runs_dir / label
    command = train_command(args, run_dir)
    logger.info("%s run: %s", label, " ".join(command[1:]))
    total_steps = args.steps * args.workers
    with LauncherJob(command, run_dir, runs_dir / f"{label}.log") as job:
        kills = drive(job, schedule, total_steps, args.timeout_s)
        wall_s = time.monotonic() - job.started_s
        if job.process.returncode != 0:
            raise RuntimeError(
                f"{label} run exited with {job.process.returncode}; log {job.log_path}:\n"
                + job.log_tail()
            )
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir / "metrics.csv")
    record = summarize_run(label, command, summary, rows, kills, wall_s)
    record["kills_not_sent"] = list(schedule[len(kills) :])
    if record["kills_not_sent"]:
        logger.warning("the job ended before these kills: %s", record["kills_not_sent"])
    return record


# ---------------------------------------------------------------- summarising


def resume_delay_s(rows: list[dict], fault: dict) -> float | None:
    """Seconds from a death until the work it stopped shows progress again.

    A worker: its first metrics row after the death (its restart included). A shard: the
    longest gap between consecutive worker rows (any rank) around the death.
    """
    start_s = fault["died_s"]
    if fault["process"].startswith("worker"):
        rank = int(fault["process"][len("worker") :])
        after = [r["time_s"] for r in rows if r["role"] == "worker" and r["rank"] == rank]
        later = [t for t in after if t > start_s]
        return min(later) - start_s if later else None
    times = sorted(r["time_s"] for r in rows if r["role"] == "worker")
    window = [t for t in times if start_s - 1.0 <= t <= start_s + SHARD_OUTAGE_WINDOW_S]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    return max(gaps) if gaps else None


def pair_kills(faults: list[dict], kills: list[dict]) -> list[dict]:
    """The launcher's faults, each with the kill that caused it (None: a death we did not
    cause) and ``died_s``: the kill's time if we sent one, unless the launcher saw the death
    earlier on the metrics axis (then its time), else the launcher's detection."""
    unmatched = list(kills)
    paired = []
    for fault in faults:
        kill = next((k for k in unmatched if k["process"] == fault["process"]), None)
        if kill is not None:
            unmatched.remove(kill)  # in order: a process may die twice
        died_s = fault["time_s"]
        if kill is not None and kill["time_s"] is not None:
            # The kill's time is mapped onto the axis with an error; the launcher cannot see
            # a death before it happens, so its time bounds the death from above.
            died_s = min(died_s, kill["time_s"])
        paired.append({**fault, "kill": kill, "died_s": died_s})
    return paired


def workers_version_at(rows: list[dict], fault: dict) -> int | None:
    """Shards: the highest version any worker had seen when the shard died.

    The launcher's ``version_before`` comes from a heartbeat up to 0.25 s old (or what the
    workers re-sending to the restarted shard saw of it); workers report every 10 steps, so
    this is another lower bound (of the most advanced shard's version).
    """
    if not fault["process"].startswith("shard"):
        return None
    seen = [
        r["version"]
        for r in rows
        if r["role"] == "worker" and r["version"] is not None and r["time_s"] <= fault["died_s"]
    ]
    return max(seen, default=None)


def summarize_run(
    label: str, command: list[str], summary: dict, rows: list[dict], kills: list, wall_s: float
) -> dict:
    """The record of one run: final accuracy, times, faults (with resume delays), curves."""
    evals = [r for r in rows if r["role"] == "evaluator" and r["test_accuracy"] is not None]
    worker_rows = [r for r in rows if r["role"] == "worker"]
    faults = pair_kills(summary["faults"], kills)
    for fault in faults:
        fault["resume_delay_s"] = resume_delay_s(rows, fault)
        fault["workers_version_at_death"] = seen = workers_version_at(rows, fault)
        restored = fault["version_restored"]
        recovered = (fault.get("updates_replayed") or 0) + (fault.get("pushes_resent") or 0)
        fault["estimated_lost_updates"] = (
            None if seen is None or restored is None else max(0, seen - restored - recovered)
        )
    return {
        "label": label,
        "command": " ".join(["python", *command[1:]]),
        "wall_s": wall_s,
        "launcher_elapsed_s": summary.get("elapsed_s"),
        "train_s": max((r["time_s"] for r in worker_rows), default=None),
        "final_test_accuracy": summary["final"].get("test_accuracy"),
        "final_version": summary["final"].get("version"),
        "worker_steps": summary["worker_steps"],
        "kills": kills,
        "faults": faults,
        "lost_updates": sum(f["lost_updates"] or 0 for f in faults),
        "estimated_lost_updates": sum(f["estimated_lost_updates"] or 0 for f in faults),
        "accuracy_curve": [[r["time_s"], r["test_accuracy"], r["version"]] for r in evals],
        "steps_curve": steps_curve(worker_rows),
    }


def steps_curve(worker_rows: list[dict]) -> list[list[float]]:
    """[time_s, steps of all workers together] at every worker row."""
    latest: dict[int, int] = {}
    curve = []
    for row in sorted(worker_rows, key=lambda r: r["time_s"]):
        latest[row["rank"]] = row["step"]
        curve.append([row["time_s"], sum(latest.values())])
    return curve


# ---------------------------------------------------------------- plot


def _mark_faults(axes, faults: list[dict], with_labels: bool) -> None:
    """A vertical line per death; labels go at the bottom, where the curves are not."""
    transform = blended_transform_factory(axes.transData, axes.transAxes)
    for fault in faults:
        shard = fault["process"].startswith("shard")
        color = "tab:red" if shard else "tab:orange"
        axes.axvline(fault["died_s"], color=color, linestyle="-" if shard else "--", lw=1.2)
        if with_labels:
            label = f" {fault['process']} killed "
            if shard:
                counted = _fmt(fault["lost_updates"], "{}")
                estimated = _fmt(fault["estimated_lost_updates"], "{}")
                label += f"\n lost {counted} (launcher) / ~{estimated} (est.) "
            box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}
            style = {"rotation": 90, "ha": "right", "va": "bottom", "fontsize": 9, "bbox": box}
            axes.text(fault["died_s"], 0.04, label, transform=transform, color=color, **style)


def with_gaps(curve: list[list[float]], max_gap_s: float) -> tuple[list[float], list[float]]:
    """x and y of ``curve`` with a NaN wherever two points are more than ``max_gap_s`` apart,
    so that an outage shows as a break in the line, not as a straight segment across it."""
    xs: list[float] = []
    ys: list[float] = []
    for point in curve:
        if xs and point[0] - xs[-1] > max_gap_s:
            xs.append(xs[-1])
            ys.append(float("nan"))
        xs.append(point[0])
        ys.append(point[1])
    return xs, ys


def plot_runs(runs: list[dict], path: Path, title: str, eval_every_s: float) -> None:
    """Test accuracy of the shards' parameters (top) and workers' steps (bottom) vs time."""
    figure = Figure(figsize=(9.5, 7.0), dpi=DPI)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for run in runs:
        style = {"color": COLORS[run["label"]], "label": LABELS[run["label"]], "lw": 1.6}
        top.plot(*with_gaps(run["accuracy_curve"], EVAL_GAP_FACTOR * eval_every_s), **style)
        steps = run["steps_curve"]
        bottom.plot([p[0] for p in steps], [p[1] for p in steps], **style)
    faults = next((r["faults"] for r in runs if r["label"] == "faults"), [])
    _mark_faults(top, faults, with_labels=True)
    _mark_faults(bottom, faults, with_labels=False)
    # The first ~2 s climb from 0.1 is the same in both runs; the axis shows the plateau,
    # where a restored shard's lost updates would show.
    top.set_ylim(ACCURACY_AXIS_FROM, 1.0)
    top.set_ylabel(
        f"test accuracy of PS parameters\n(axis from {ACCURACY_AXIS_FROM:g}; gaps: no evaluation)"
    )
    bottom.set_ylabel("steps, all workers")
    bottom.set_xlabel("seconds since training started")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    top.legend(loc="center right", frameon=True)
    figure.suptitle(title, fontsize=12)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    logger.info("wrote %s", path)


# ---------------------------------------------------------------- tables


def _fmt(value: object, spec: str, missing: str = "-") -> str:
    return missing if value is None else spec.format(value)


def _pair(first: object, second: object) -> str:
    both_missing = first is None and second is None
    return "-" if both_missing else f"{_fmt(first, '{}')} / {_fmt(second, '{}')}"


def fault_lines(run: dict) -> tuple[list[str], list[list[str]]]:
    """One table row per death in the disturbed run, with the kill that caused it."""
    header = ["#", "process", "killed at: % of steps, s", "launcher saw it at (s)", "action"]
    header += ["exit code", "version before / restored", "replayed / resent"]
    header += ["lost updates (launcher)"]
    header += ["workers' version at kill", "lost updates (est.)", "work resumed after (s)"]
    lines = []
    for i, fault in enumerate(run["faults"]):
        kill = fault["kill"]
        killed_at = "not killed by us"
        if kill is not None:
            killed_at = f"{100 * kill['progress']:.0f}%, {_fmt(kill['time_s'], '{:.2f}')}"
        cells = [str(i + 1), fault["process"], killed_at, f"{fault['time_s']:.2f}"]
        cells += [fault["action"], _fmt(fault["exitcode"], "{}")]
        cells += [_pair(fault["version_before"], fault["version_restored"])]
        cells += [_pair(fault.get("updates_replayed"), fault.get("pushes_resent"))]
        cells += [_fmt(fault[key], "{}") for key in ("lost_updates", "workers_version_at_death")]
        cells += [_fmt(fault["estimated_lost_updates"], "{}")]
        lines.append([*cells, _fmt(fault["resume_delay_s"], "{:.2f}")])
    return header, lines


def _lost_row(name: str, lost: int, total: int) -> list[str]:
    return [name, f"{lost} / {total} ({100 * lost / max(total, 1):.2f}%)", "0"]


def comparison_lines(runs: dict[str, dict], args: argparse.Namespace) -> list[list[str]]:
    """The disturbed run next to the undisturbed one."""
    faults, base = runs["faults"], runs.get("baseline", {})
    total = sum(faults["worker_steps"].values()) // args.n_push * args.shards

    def row(name: str, key: str, spec: str) -> list[str]:
        return [name, _fmt(faults.get(key), spec), _fmt(base.get(key), spec)]

    return [
        row("final test accuracy", "final_test_accuracy", "{:.4f}"),
        row("final version (highest shard)", "final_version", "{}"),
        row("training time (s, last worker row)", "train_s", "{:.1f}"),
        row("wall time (s, launch to exit)", "wall_s", "{:.1f}"),
        _lost_row("lost updates (launcher) / pushes x shards", faults["lost_updates"], total),
        _lost_row("lost updates (est.) / pushes x shards", faults["estimated_lost_updates"], total),
        ["checkpoint interval (s)", f"{args.checkpoint_every_s:g}", f"{args.checkpoint_every_s:g}"],
    ]


def _md_table(header: list[str], lines: list[list[str]]) -> list[str]:
    text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return text + ["| " + " | ".join(cells) + " |" for cells in lines]


def settings(args: argparse.Namespace) -> dict:
    """The knobs of this invocation that shape the runs (kept in the JSON for --replot)."""
    names = ("schedule", "steps", "workers", "shards", "checkpoint_every_s", "eval_every_s")
    return {name: getattr(args, name) for name in (*names, "max_restarts", "seed", "n_push")}


def write_results(stem: Path, runs: dict[str, dict], args: argparse.Namespace) -> None:
    """``<stem>.json`` (every number and curve) and ``<stem>.md`` (the tables)."""
    record = {**machine.environment(), "settings": settings(args), "runs": runs}
    header, lines = fault_lines(runs["faults"])
    text = [f"# Fault tolerance: LeNet on digits, {args.shards} shards x {args.workers} workers"]
    text += ["", f"Command: `{record['command']}`", ""]
    text += [f"Each run: `{runs['faults']['command']}`", ""]
    text += [
        f"Date: {record['date']}; {record['cpu_count']} CPUs; torch {record['torch_version']}; "
        f"load average at the end {record['load_average_1_5_15_min']}",
        "",
    ]
    text += [*_md_table(header, lines), ""]
    if runs["faults"]["kills_not_sent"]:
        text += [f"Not killed (the job ended first): {runs['faults']['kills_not_sent']}", ""]
    text += _md_table(["", "with kills", "undisturbed"], comparison_lines(runs, args))
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_text_atomic(stem.with_suffix(".md"), "\n".join(text) + "\n")
    print("\n".join(text))
    logger.info("wrote %s.{md,json}", stem)


# ---------------------------------------------------------------- CLI


def _schedule(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [n for n in names if not (n.startswith(("worker", "shard")) and n[-1].isdigit())]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected names like worker1,shard0; got {text!r}")
    return names


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--schedule", type=_schedule, default=None, help=DEFAULT_SCHEDULE)
    parser.add_argument(
        "--steps", type=machine.at_least(1), default=None, help="per worker (default 3000)"
    )
    parser.add_argument("--workers", type=machine.at_least(1), default=2)
    parser.add_argument("--shards", type=machine.at_least(1), default=2)
    parser.add_argument(
        "--checkpoint-every", dest="checkpoint_every_s", type=machine.above_zero, default=2.0
    )
    parser.add_argument("--eval-every", dest="eval_every_s", type=machine.above_zero, default=0.5)
    parser.add_argument("--max-restarts", type=machine.at_least(0), default=3)
    parser.add_argument("--seed", type=machine.seed, default=0)
    parser.add_argument(
        "--timeout", dest="timeout_s", type=machine.above_zero, default=240.0, help="per run"
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument(
        "--out",
        type=machine.out_folder,
        default=None,
        help='default benchmarks/results; "-" for none',
    )
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--quick", action="store_true", help="800 steps, 2 kills; no results")
    parser.add_argument(
        "--replot", type=machine.record_file(), metavar="JSON", help="redraw the PNG of a JSON"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    if args.schedule is None:
        args.schedule = _schedule(QUICK_SCHEDULE if args.quick else DEFAULT_SCHEDULE)
    if args.steps is None:
        args.steps = 800 if args.quick else 3000
    args.n_push = 1  # the CLI's default; lost updates are counted in pushes
    for name in args.schedule:
        kind, index = ("worker", args.workers) if name.startswith("w") else ("shard", args.shards)
        if int(name[len(kind) :]) >= index:
            raise SystemExit(f"--schedule: {name} does not exist with {index} {kind}s")
    return args


def plot_record(record: dict, stem: Path) -> None:
    """``<stem>_accuracy.png`` from a results record (fresh, or read back for --replot)."""
    knobs = record["settings"]
    title = (
        f"SIGKILLs during Downpour SGD (LeNet, digits, {knobs['shards']} shards x "
        f"{knobs['workers']} workers, checkpoint every {knobs['checkpoint_every_s']:g} s)"
    )
    path = stem.parent / f"{stem.name}_accuracy.png"
    plot_runs(list(record["runs"].values()), path, title, knobs["eval_every_s"])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.replot is not None:
        plot_record(json.loads(args.replot.read_text()), args.replot.with_suffix(""))
        return 0
    # Without --runs-dir the runs (and the results of --quick or --out -, next to them) are
    # removed at the end, however it ends: each run folder holds checkpoints of every shard.
    with machine.output_dirs(args, "faults", RESULTS_DIR) as (out, runs_dir):
        runs_dir.mkdir(parents=True, exist_ok=True)
        stem = out / f"faults_cpu{os.cpu_count()}_{datetime.date.today():%Y%m%d}"
        runs = {"faults": run_job(args, runs_dir, "faults", args.schedule)}
        if args.baseline:
            runs["baseline"] = run_job(args, runs_dir, "baseline", [])
        plot_record({"settings": settings(args), "runs": runs}, stem)
        write_results(stem, runs, args)
        if args.runs_dir is not None:
            logger.info("run folders: %s", runs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
