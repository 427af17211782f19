"""Staleness sweep: Downpour SGD on digits (LeNet) for {1, 2, 4, 8} workers x {plain async,
scale, dc-asgd, SSP}, every run at the same total number of samples and the same seed.

Owns the sweep, the summary of each run (time and updates to 90% test accuracy, staleness
percentiles), its plots and its md/json table; training itself is ``distbelief.launch.job``'s.
adagrad_vs_sgd.py imports the run/summary/plot/table helpers from here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import machine
from distbelief.config import FLAT_FIELDS, JobConfig
from distbelief.data import load_dataset
from distbelief.errors import DistBeliefError, LauncherInterrupted
from distbelief.files import write_file_atomic, write_text_atomic
from distbelief.launch import train
from distbelief.telemetry import read_metrics

logger = logging.getLogger("staleness_sweep")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_ACCURACY = 0.9
"""Test accuracy whose first crossing gives "time to 90%"."""
EVAL_EVERY_S = 0.25
"""Evaluator period; also the resolution of every "time to 90%" (plus one evaluation)."""
BASE = {
    "model": "lenet",
    "dataset": "digits",
    "num_shards": 2,
    "lr": 0.05,
    "server_lr": 0.05,
    "batch_size": 32,
    "eval_every_s": EVAL_EVERY_S,
}
SSP_BOUND_STEPS = 2
DEFAULT_WORKERS = [1, 2, 4, 8]
POLICIES = {
    "none": {"staleness_policy": "none", "max_staleness": None},
    "scale": {"staleness_policy": "scale", "max_staleness": None},
    "dc-asgd": {"staleness_policy": "dc-asgd", "max_staleness": None},
    "ssp": {"staleness_policy": "none", "max_staleness": SSP_BOUND_STEPS},
}
POLICY_LABELS = {
    "none": "async (none)",
    "scale": "scale (g / staleness)",
    "dc-asgd": "DC-ASGD",
    "ssp": f"SSP (bound {SSP_BOUND_STEPS} steps)",
}
DPI = 110


# ---------------------------------------------------------------- running and summarising


def steps_per_worker(epochs: int, num_workers: int, batch_size: int, dataset: str) -> int:
    """Steps each worker runs so that all workers together see ``epochs`` passes' worth of
    full batches, whatever the worker count (a fixed total data budget)."""
    num_train = len(load_dataset(dataset, split="train"))
    return math.ceil(epochs * (num_train // batch_size) / num_workers)


def staleness_stats(histogram: dict[int, int]) -> dict[str, float | None]:
    """Mean, p90 and max of a {staleness: pushes} histogram (None when it is empty)."""
    total = sum(histogram.values())
    if total == 0:
        return {"mean": None, "p90": None, "max": None}
    cumulative, p90 = 0, None
    for staleness in sorted(histogram):
        cumulative += histogram[staleness]
        if p90 is None and cumulative >= 0.9 * total:
            p90 = staleness
    mean = sum(s * n for s, n in histogram.items()) / total
    return {"mean": mean, "p90": p90, "max": max(histogram)}


def first_crossing(curve: Sequence[Sequence[float]], target: float) -> tuple[float, int] | None:
    """(time_s, version) of the first evaluation at or above ``target``, or None."""
    for time_s, version, accuracy in curve:
        if accuracy >= target:
            return time_s, int(version)
    return None


def summarize_run(run_dir: Path, elapsed_s: float) -> dict:
    """One run folder as a table row: accuracy curve, 90% crossing, staleness, times."""
    records = read_metrics(run_dir / "metrics.csv")
    curve = sorted(
        (r["time_s"], r["version"], r["test_accuracy"])
        for r in records
        if r["role"] == "evaluator" and r["test_accuracy"] is not None
    )
    per_shard = json.loads((run_dir / "staleness.json").read_text())
    # Every push reaches every shard, so the pooled histogram counts each push once per shard.
    histogram: Counter[int] = Counter()
    for counts in per_shard.values():
        histogram.update({int(s): n for s, n in counts.items()})
    crossing = first_crossing(curve, TARGET_ACCURACY)
    worker_times = [r["time_s"] for r in records if r["role"] == "worker"]
    return {
        "final_acc": curve[-1][2] if curve else None,
        "best_acc": max(c[2] for c in curve) if curve else None,
        "time_to_target_s": crossing[0] if crossing else None,
        "updates_to_target": crossing[1] if crossing else None,
        "updates": curve[-1][1] if curve else None,
        "staleness": staleness_stats(histogram),
        "train_s": max(worker_times) if worker_times else None,
        "wall_s": elapsed_s,
        "histogram": {str(s): n for s, n in sorted(histogram.items())},
        "curve": [[round(t, 3), v, a] for t, v, a in curve],
    }


def job_config(**settings: object) -> JobConfig:
    """The job of benchmark settings; they keep the flat names of the config (``FLAT_FIELDS``)
    because the result files record them so and the reports read them back."""
    return JobConfig.from_fields({FLAT_FIELDS[name]: value for name, value in settings.items()})


def run_job(config: JobConfig, label: str) -> dict:
    """Train one job and summarise it; a failed job becomes a row with its error."""
    logger.info("run %s -> %s", label, config.reporting.out_dir)
    row: dict = {"label": label, "run_dir": config.reporting.out_dir}
    try:
        result = train(config)
    except LauncherInterrupted:  # Ctrl-C or SIGTERM inside train(): the sweep stops too
        raise
    except DistBeliefError as e:
        logger.error("run %s failed: %s", label, e)
        # The table gets the last line (a child's exception); the JSON keeps the traceback.
        last_line = [line for line in str(e).splitlines() if line.strip()][-1:] or [""]
        short = f"{type(e).__name__}: {last_line[0].strip()}".replace("|", "/")
        return {**row, "error": short, "error_detail": str(e)}
    row.update(summarize_run(result.run_dir, result.elapsed_s))
    logger.info(
        "run %s: final %.3f, best %.3f, 90%% at %s s, wall %.1f s",
        label,
        row["final_acc"] or float("nan"),
        row["best_acc"] or float("nan"),
        _fmt(row["time_to_target_s"], "{:.2f}"),
        row["wall_s"],
    )
    return row


def sweep(args: argparse.Namespace, runs_dir: Path) -> list[dict]:
    rows = []
    for num_workers in args.workers:
        steps = steps_per_worker(args.epochs, num_workers, BASE["batch_size"], BASE["dataset"])
        for policy in args.policies:
            config = job_config(
                **BASE,
                **POLICIES[policy],
                num_workers=num_workers,
                steps=steps,
                seed=args.seed,
                out_dir=str(runs_dir / f"w{num_workers}_{policy}"),
            )
            row = run_job(config, f"{num_workers} workers, {policy}")
            rows.append({"workers": num_workers, "policy": policy, "steps": steps, **row})
    return rows


# ---------------------------------------------------------------- plots


def new_figure(num_panels: int, panel_in: tuple[float, float] = (5.5, 3.8)):
    """A figure with ``num_panels`` axes in rows of at most two, and its axes list."""
    ncols = min(num_panels, 2)
    nrows = math.ceil(num_panels / ncols)
    figure = Figure(figsize=(panel_in[0] * ncols, panel_in[1] * nrows + 0.9), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(nrows, ncols, i + 1) for i in range(num_panels)]
    return figure, axes


def save_figure(
    figure: Figure, path: Path, title: str, *, legend: bool = True, legend_columns: int = 4
) -> None:
    """Title on top, one shared legend below the panels (never over a curve), PNG out."""
    figure.suptitle(title, fontsize=12)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    if legend and handles:
        columns = min(len(labels), legend_columns)
        figure.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
        # Reserve about 0.25 inch per legend row below the panels.
        legend_in = 0.25 * math.ceil(len(labels) / columns) + 0.1
        figure.tight_layout(rect=(0, legend_in / figure.get_figheight(), 1, 1))
    else:
        figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    logger.info("wrote %s", path)


def plot_accuracy(axes, rows: list[dict], x_index: int, x_label: str, title: str) -> None:
    """One line per row (its "label_short") of PS test accuracy vs curve column x_index."""
    for row in rows:
        curve = row.get("curve") or []
        xs = [point[x_index] for point in curve]
        axes.plot(xs, [p[2] for p in curve], marker="o", markersize=3, label=row["label_short"])
    axes.axhline(TARGET_ACCURACY, color="silver", linestyle=":", linewidth=1.2)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlim(left=0.0)
    axes.set_xlabel(x_label)
    axes.set_ylabel("PS test accuracy")
    axes.set_title(title, fontsize=11)
    axes.grid(True, alpha=0.3)


def plot_sweep_accuracy(rows: list[dict], args, x_index: int, x_label: str, path: Path) -> None:
    figure, panels = new_figure(len(args.workers))
    for axes, num_workers in zip(panels, args.workers, strict=True):
        group = [
            {**r, "label_short": POLICY_LABELS[r["policy"]]}
            for r in rows
            if r["workers"] == num_workers
        ]
        plot_accuracy(axes, group, x_index, x_label, workers_title(num_workers))
    title = f"LeNet on digits, 2 shards, {args.epochs} epoch(s) of data per run"
    save_figure(figure, path, title, legend_columns=2 if len(panels) == 1 else 4)


def _row(rows: list[dict], num_workers: int, policy: str) -> dict:
    return next((r for r in rows if (r["workers"], r["policy"]) == (num_workers, policy)), {})


def workers_title(num_workers: int) -> str:
    return f"{num_workers} worker" + ("" if num_workers == 1 else "s")


def plot_staleness(rows: list[dict], args, path: Path) -> None:
    """Bars: plain async's staleness histogram per worker count; outline: SSP's, if run."""
    figure, panels = new_figure(len(args.workers))
    for axes, num_workers in zip(panels, args.workers, strict=True):
        top = 0.0
        for policy in ("none", "ssp"):
            row = _row(rows, num_workers, policy)
            histogram = {int(s): n for s, n in row.get("histogram", {}).items()}
            total = sum(histogram.values())
            if not total:
                continue
            fractions = [histogram.get(s, 0) / total for s in range(max(histogram) + 1)]
            top = max(top, *fractions)
            stats = row["staleness"]
            label = f"{POLICY_LABELS[policy]}: mean {stats['mean']:.1f}, p90 {stats['p90']}"
            if policy == "none":
                axes.bar(range(len(fractions)), fractions, width=0.9, alpha=0.6, label=label)
            else:
                edges = [s - 0.5 for s in range(len(fractions) + 1)]
                axes.stairs(fractions, edges, color="C3", linewidth=1.8, label=label)
        axes.set_xlabel("staleness (updates applied between fetch and push)")
        axes.set_ylabel("fraction of pushes")
        axes.set_title(workers_title(num_workers), fontsize=11)
        axes.grid(True, axis="y", alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if top:
            # Head room above the tallest bar keeps the legend clear of the bars.
            axes.set_ylim(0.0, top * 1.35)
            axes.legend(loc="upper right", fontsize="small", frameon=False)
    save_figure(figure, path, "Staleness of pushes (all shards)", legend=False)


# ---------------------------------------------------------------- tables


def _fmt(value: object, spec: str, missing: str = "-") -> str:
    return missing if value is None else spec.format(value)


def command_line() -> str:
    return " ".join([f"{Path(sys.executable).name}", *sys.argv])


def environment() -> dict:
    # Which distbelief ran (PYTHONPATH may point at a snapshot of src/).
    source = str(Path(train.__code__.co_filename).parents[1])
    return {**machine.environment(command_line()), "distbelief_source": source}


def write_table(path_stem: Path, title: str, record: dict, header: list[str], lines: list) -> None:
    """``<stem>.json`` (the record) and ``<stem>.md`` (title, command, table)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path_stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    text = [f"# {title}", "", f"Command: `{record['command']}`", ""]
    load = record.get("load_average_1_5_15_min")
    text += [
        f"Date: {record['date']}; {record['cpu_count']} CPUs; torch {record['torch_version']}"
        + (f"; load average at the end {load}" if load else "")
    ]
    text += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(cells) + " |" for cells in lines]
    write_text_atomic(path_stem.with_suffix(".md"), "\n".join(text) + "\n")
    print("\n".join(text))
    logger.info("wrote %s.{md,json}", path_stem)


def sweep_table_lines(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["workers", "policy", "final acc", "best acc", "time to 90% (s)", "updates to 90%"]
    header += ["staleness mean", "staleness p90", "train s", "wall s"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([str(r["workers"]), r["policy"], r["error"], *[""] * 7])
            continue
        lines.append(
            [
                str(r["workers"]),
                r["policy"],
                _fmt(r["final_acc"], "{:.3f}"),
                _fmt(r["best_acc"], "{:.3f}"),
                _fmt(r["time_to_target_s"], "{:.2f}", "not reached"),
                _fmt(r["updates_to_target"], "{}", "not reached"),
                _fmt(r["staleness"]["mean"], "{:.2f}"),
                _fmt(r["staleness"]["p90"], "{}"),
                _fmt(r["train_s"], "{:.1f}"),
                _fmt(r["wall_s"], "{:.1f}"),
            ]
        )
    return header, lines


# ---------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4,8, got {text!r}") from e
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"worker counts must be >= 1, got {text!r}")
    return values


def _policy_list(text: str) -> list[str]:
    values = text.split(",")
    unknown = [v for v in values if v not in POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policies {unknown}; choose from {list(POLICIES)}"
        )
    return values


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--workers", type=_int_list, default=None, help="default 1,2,4,8")
    parser.add_argument("--policies", type=_policy_list, default=list(POLICIES))
    parser.add_argument("--epochs", type=int, default=None, help="data budget (default 20)")
    parser.add_argument("--seed", type=machine.seed, default=0)
    parser.add_argument(
        "--out",
        type=machine.out_folder,
        default=None,
        help="default benchmarks/results; -: next to the runs",
    )
    parser.add_argument("--runs-dir", type=Path, default=None, help="run folders (default tmp)")
    parser.add_argument(
        "--quick", action="store_true", help="workers 1,2, 1 epoch; results next to the runs"
    )
    parser.add_argument(
        "--replot",
        type=machine.record_file("staleness_sweep"),
        default=None,
        help="redraw PNGs from a JSON",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = [1, 2] if args.quick else DEFAULT_WORKERS
    if args.epochs is None:
        args.epochs = 1 if args.quick else 20
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def plot_all(rows: list[dict], args: argparse.Namespace, stem: Path) -> None:
    plot_sweep_accuracy(rows, args, 0, "time since training started (s)", Path(f"{stem}_time.png"))
    plot_sweep_accuracy(rows, args, 1, "updates applied by a shard", Path(f"{stem}_updates.png"))
    plot_staleness(rows, args, Path(f"{stem}_staleness_hist.png"))


def replot(json_path: Path) -> int:
    """Redraw the PNGs of an earlier sweep from its JSON (no training)."""
    record = json.loads(json_path.read_text())
    settings = record["settings"]
    args = argparse.Namespace(workers=settings["workers"], epochs=settings["epochs"])
    plot_all(record["rows"], args, json_path.with_suffix(""))
    return 0


def sweep_name(args: argparse.Namespace) -> str:
    """ "staleness_sweep", plus the worker counts and seed when they are not the defaults."""
    name = "staleness_sweep"
    if not args.quick and args.workers != DEFAULT_WORKERS:
        name += "_w" + "-".join(str(n) for n in args.workers)
    return name + (f"_seed{args.seed}" if args.seed else "")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    with machine.output_dirs(args, "staleness_sweep", RESULTS_DIR) as (out, runs_dir):
        rows = sweep(args, runs_dir)
        stem = out / f"{sweep_name(args)}_cpu{os.cpu_count()}_{datetime.date.today():%Y%m%d}"
        settings = {**BASE, "epochs": args.epochs, "seed": args.seed, "workers": args.workers}
        settings |= {"policies": {p: POLICIES[p] for p in args.policies}}
        settings |= {"runs_dir": str(args.runs_dir) if args.runs_dir else None}
        record = {"benchmark": "staleness_sweep", **environment(), "settings": settings}
        record["rows"] = rows
        header, lines = sweep_table_lines(rows)
        write_table(stem, "Staleness sweep: LeNet on digits, 2 shards", record, header, lines)
        plot_all(rows, args, stem)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
