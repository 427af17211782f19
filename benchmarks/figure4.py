"""Dean et al. 2012, Figure 4, at small scale on one machine: test accuracy vs time for
one-replica SGD, Downpour SGD, Downpour + Adagrad (warmstarted) and Sandblaster L-BFGS, the same
model and data, each run through the library's ``train`` for a similar time budget.

Owns the four jobs, the budget (each curve is cut at ``--budget-s`` seconds of training: every
method gets the same time, whatever it finished), the plot and the md/json table. Run summaries
(the evaluator's accuracy curve, time to 90%) come from staleness_sweep.py (same folder).
Every job has the same shards and evaluator period; the evaluator tests the shards' parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import machine
from distbelief.config import JobConfig
from distbelief.data import load_dataset
from distbelief.files import write_file_atomic
from distbelief.telemetry import read_metrics
from staleness_sweep import EVAL_EVERY_S, TARGET_ACCURACY, environment, run_job

logger = logging.getLogger("figure4")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("sgd", "downpour", "adagrad", "sandblaster")
LABELS = {
    "sgd": "SGD, 1 replica (Downpour, 1 worker)",
    "downpour": "Downpour SGD",
    "adagrad": "Downpour + Adagrad (warmstart)",
    "sandblaster": "Sandblaster L-BFGS",
}
COLORS = {"sgd": "black", "downpour": "tab:blue", "adagrad": "tab:red", "sandblaster": "tab:green"}
DPI = 110


def job_fields(method: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """The job of ``method``: dotted config fields."""
    fields = {
        "model.name": args.model,
        "data.name": "digits",
        "model.seed": args.seed,
        "cluster.num_shards": args.shards,
        "cluster.num_workers": 1 if method == "sgd" else args.workers,
        "reporting.eval_every_s": EVAL_EVERY_S,
        "reporting.out_dir": str(out_dir / method),
    }
    if method == "sandblaster":
        return fields | {
            "optimizer.algorithm": "sandblaster",
            "optimizer.batch_size": args.sandblaster_batch_size,
            "sandblaster.history": args.history,
            "sandblaster.max_iterations": args.sandblaster_iterations,
            "sandblaster.step_size": args.step_size,
        }
    fields |= {"optimizer.batch_size": args.minibatch_size, "optimizer.lr": args.sgd_lr}
    if method == "sgd":
        return fields | {"optimizer.steps": args.sgd_steps, "server.lr": args.sgd_lr}
    fields["optimizer.steps"] = args.steps_per_worker
    if method == "downpour":
        return fields | {"server.lr": args.sgd_lr}
    return fields | {
        "server.optimizer": "adagrad",
        "server.lr": args.adagrad_lr,
        "optimizer.warmstart_steps": args.warmstart_steps,
    }


def within_budget(row: dict, budget_s: float, num_train: int) -> dict:
    """The run's figures over its first ``budget_s`` seconds of training; the examples used
    until 90% (gradient examples: Downpour's pushes x batch, Sandblaster's evaluations x
    batch) and what that is in passes over the training set."""
    curve = [point for point in row.get("curve") or [] if point[0] <= budget_s]
    crossing = next((point for point in curve if point[2] >= TARGET_ACCURACY), None)
    examples = None
    if crossing is not None:
        examples = examples_until(row, int(crossing[1]), num_train)
    return {
        "acc_at_budget": curve[-1][2] if curve else None,
        "best_acc_in_budget": max(point[2] for point in curve) if curve else None,
        "time_to_target_s": crossing[0] if crossing else None,
        "examples_to_target": examples,
        "passes_to_target": None if examples is None else examples / num_train,
        "trained_s": row.get("train_s"),
        "ran_past_budget": (row.get("train_s") or 0.0) > budget_s,
    }


def examples_until(row: dict, version: int, num_train: int) -> int:
    """Gradient examples computed until the shards reached ``version``: a Downpour push is
    one mini-batch; a Sandblaster iteration writes the parameters once, after its
    evaluations of the whole batch (iteration 0: one evaluation)."""
    fields = row["fields"]
    if fields.get("optimizer.algorithm") != "sandblaster":
        return version * fields["optimizer.batch_size"]
    batch = fields["optimizer.batch_size"] or num_train
    records = read_metrics(Path(row["run_dir"]) / "metrics.csv")
    evaluations = sum(
        int(r["evaluations"])
        for r in records
        if r["role"] == "coordinator" and r["step"] is not None and r["step"] <= version
    )
    return evaluations * batch


def run_all(args: argparse.Namespace, runs_dir: Path) -> list[dict]:
    rows = []
    num_train = len(load_dataset("digits", split="train"))
    for method in args.methods:
        fields = job_fields(method, args, runs_dir)
        row = run_job(JobConfig.from_fields(fields), LABELS[method])
        row |= {"method": method, "fields": fields}
        if "error" not in row:
            if method == "sandblaster":
                summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
                row["coordinator"] = summary.get("coordinator", {})
            row |= within_budget(row, args.budget_s, num_train)
        logger.info("%s: %s (load %.1f)", method, row.get("acc_at_budget"), os.getloadavg()[0])
        rows.append(row)
    return rows


# ---------------------------------------------------------------- plot and table


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    figure = Figure(figsize=(8.0, 5.2), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for row in rows:
        curve = [p for p in row.get("curve") or [] if p[0] <= args.budget_s]
        if not curve:
            continue
        label = LABELS[row["method"]]
        if row.get("time_to_target_s") is not None:
            label += f": {TARGET_ACCURACY:.0%} at {row['time_to_target_s']:.1f} s"
        axes.plot(
            [p[0] for p in curve],
            [p[2] for p in curve],
            color=COLORS[row["method"]],
            marker="o",
            markersize=2.5,
            linewidth=1.6,
            label=label,
        )
    axes.axhline(TARGET_ACCURACY, color="silver", linestyle=":", linewidth=1.2)
    axes.set_xlim(0.0, args.budget_s)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("time since training started (s)")
    axes.set_ylabel("test accuracy (parameter server)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.suptitle(
        f"{args.model} on digits, {args.shards} shards, {args.workers} workers (SGD: 1), "
        f"{os.cpu_count()} CPUs",
        fontsize=11,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    logger.info("wrote %s", path)


def _fmt(value: object, spec: str, missing: str = "-") -> str:
    return missing if value is None else spec.format(value)


def settings_text(method: str, args: argparse.Namespace) -> str:
    if method == "sandblaster":
        batch = args.sandblaster_batch_size or "whole set"
        return (
            f"batch {batch}, m {args.history}, step {args.step_size:g} + strong Wolfe, "
            f"{args.sandblaster_iterations} iterations max"
        )
    if method == "sgd":
        return f"lr {args.sgd_lr:g}, batch {args.minibatch_size}, {args.sgd_steps} steps"
    text = f"lr {args.sgd_lr:g}, batch {args.minibatch_size}, {args.steps_per_worker} steps/worker"
    if method == "adagrad":
        text += f", server Adagrad {args.adagrad_lr:g}, warmstart {args.warmstart_steps}"
    return text


def report(stem: Path, record: dict, args: argparse.Namespace) -> str:
    header = ["method", "settings", f"acc at {args.budget_s:g} s", "best acc in budget"]
    header += [f"time to {TARGET_ACCURACY:.0%} (s)", "gradient examples to 90% (passes)"]
    header += ["trained (s)", "wall (s)"]
    cells = []
    for row in record["rows"]:
        if "error" in row:
            cells.append([LABELS[row["method"]], row["error"], *[""] * 6])
            continue
        cells.append(
            [
                LABELS[row["method"]],
                settings_text(row["method"], args),
                _fmt(row["acc_at_budget"], "{:.3f}"),
                _fmt(row["best_acc_in_budget"], "{:.3f}"),
                _fmt(row["time_to_target_s"], "{:.2f}", "not reached"),
                "-"
                if row["examples_to_target"] is None
                else f"{row['examples_to_target']} ({row['passes_to_target']:.1f})",
                _fmt(row["trained_s"], "{:.1f}"),
                _fmt(row["wall_s"], "{:.1f}"),
            ]
        )
    description = (
        f"{args.model} on digits (1437 train / 360 test images), {args.shards} shards; Downpour "
        f"and Sandblaster with {args.workers} workers. Each curve is the evaluator's test "
        f"accuracy every {EVAL_EVERY_S:g} s, cut at {args.budget_s:g} s of training (time "
        f"since the first worker started; process start-up excluded). 'trained' is how long "
        f"the job trained in all; 'wall' includes start-up."
    )
    return machine.write_report(
        stem, record, "Figure 4 at small scale: accuracy vs time", description, header, cells
    )


# ---------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--model", default="lenet", choices=("lenet", "mlp"))
    parser.add_argument(
        "--workers", type=machine.at_least(1), default=4, help="Downpour and Sandblaster"
    )
    parser.add_argument("--shards", type=machine.at_least(1), default=2)
    parser.add_argument(
        "--budget-s", type=machine.above_zero, default=None, help="default 25 (--quick: 6)"
    )
    parser.add_argument("--minibatch-size", type=machine.at_least(1), default=32)
    parser.add_argument("--sgd-lr", type=machine.above_zero, default=0.05, help="SGD and Downpour")
    parser.add_argument("--sgd-steps", type=machine.at_least(1), default=None, help="default 2500")
    parser.add_argument(
        "--steps-per-worker", type=machine.at_least(1), default=None, help="default 700"
    )
    parser.add_argument("--adagrad-lr", type=machine.above_zero, default=0.01)
    parser.add_argument("--warmstart-steps", type=machine.at_least(0), default=50)
    parser.add_argument(
        "--sandblaster-batch-size", type=machine.at_least(1), default=None, help="default all"
    )
    parser.add_argument(
        "--sandblaster-iterations", type=machine.at_least(1), default=None, help="default 50"
    )
    parser.add_argument("--history", type=machine.at_least(1), default=10)
    parser.add_argument("--step-size", type=machine.above_zero, default=1.0)
    parser.add_argument("--seed", type=machine.seed, default=0)
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="file stem; - writes nothing"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="keep the run folders here (default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--quick", action="store_true", help="6 s budget; writes no results")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.methods = [name for name in args.methods.split(",") if name]
    quick = args.quick
    defaults = {"budget_s": 6.0, "sgd_steps": 600, "steps_per_worker": 200}
    if not quick:
        defaults = {"budget_s": 25.0, "sgd_steps": 2500, "steps_per_worker": 700}
    defaults["sandblaster_iterations"] = 10 if quick else 50
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        date = datetime.date.today().strftime("%Y%m%d")
        args.out = Path("-") if quick else RESULTS_DIR / f"figure4_cpu{os.cpu_count()}_{date}"
    if not args.methods or not set(args.methods) <= set(METHODS):
        parser.error(f"argument --methods: must name some of {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        # Without --runs-dir the run folders are scratch: removed once the rows are read.
        runs_dir = args.runs_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="figure4_"))
        )
        rows = run_all(args, runs_dir)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings |= {"eval_every_s": EVAL_EVERY_S}
    record = {"benchmark": "figure4", **environment(), "settings": settings, "rows": rows}
    print(report(args.out, record, args))
    if str(args.out) != "-":
        plot(rows, args, args.out.with_suffix(".png"))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
