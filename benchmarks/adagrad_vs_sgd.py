"""Downpour SGD vs Downpour + Adagrad on the shards at the same data budget (after Dean et al.
2012, Figure 4): LeNet on digits, 4 workers, 2 shards, a small grid of server learning rates.

Owns the grid, its plot and its md/json table; runs, summaries, plots and tables come from
staleness_sweep.py (same folder). Order: the SGD grid first, then Adagrad with the best SGD rate
as the workers' local rate, each gamma without and with a warmstart of one replica.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path

import machine
from distbelief.config import FLAT_FIELDS
from staleness_sweep import (
    BASE,
    RESULTS_DIR,
    environment,
    job_config,
    new_figure,
    plot_accuracy,
    run_job,
    save_figure,
    steps_per_worker,
    write_table,
)

logger = logging.getLogger("adagrad_vs_sgd")

NUM_WORKERS = 4
WARMSTART_STEPS = 50
"""Pushes replica 0 makes alone before the other replicas start (the paper's warmstart)."""


def best_row(rows: list[dict]) -> dict:
    """The run that reached 90% first; if none did, the one with the best accuracy."""
    reached = [r for r in rows if r.get("time_to_target_s") is not None]
    if reached:
        return min(reached, key=lambda r: r["time_to_target_s"])
    return max(rows, key=lambda r: r.get("best_acc") or 0.0)


def run_config(args, runs_dir: Path, name: str, **changes) -> dict:
    steps = steps_per_worker(args.epochs, NUM_WORKERS, BASE["batch_size"], BASE["dataset"])
    settings = {**BASE, "num_workers": NUM_WORKERS, "steps": steps, "seed": args.seed, **changes}
    config = job_config(**settings, out_dir=str(runs_dir / name.replace(" ", "_")))
    row = run_job(config, name)
    keys = ("server_optimizer", "server_lr", "lr", "warmstart_steps", "steps")
    fields = config.to_fields()
    return {**{k: fields[FLAT_FIELDS[k]] for k in keys}, **row, "label_short": name}


def run_grid(args: argparse.Namespace, runs_dir: Path) -> list[dict]:
    rows = [
        run_config(args, runs_dir, f"SGD lr {lr:g}", server_optimizer="sgd", server_lr=lr, lr=lr)
        for lr in args.sgd_lrs
    ]
    local_lr = best_row([r for r in rows if "error" not in r] or rows)["lr"]
    logger.info("best SGD rate %g: the Adagrad runs use it as the workers' local rate", local_lr)
    steps = steps_per_worker(args.epochs, NUM_WORKERS, BASE["batch_size"], BASE["dataset"])
    # Replica 0 alone must be able to make the warmstart's pushes, or the others wait for the
    # shards' version until their hold timeout (the config alone cannot check this).
    warmstart_steps = min(args.warmstart_steps, steps // 2)
    if warmstart_steps < args.warmstart_steps:
        logger.warning("warmstart cut to %d steps: %d steps per worker", warmstart_steps, steps)
    for gamma in args.adagrad_lrs:
        for warmstart in (0, warmstart_steps):
            name = f"Adagrad gamma {gamma:g}" + (f" + warmstart {warmstart}" if warmstart else "")
            rows.append(
                run_config(
                    args,
                    runs_dir,
                    name,
                    server_optimizer="adagrad",
                    server_lr=gamma,
                    lr=local_lr,
                    warmstart_steps=warmstart,
                )
            )
    return rows


SGD_COLORS = ("black", "tab:gray", "tab:brown", "tab:pink")
ADAGRAD_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:olive")


def line_styles(rows: list[dict]) -> list[dict]:
    """SGD: grey shades, solid, squares. Adagrad: one colour per gamma; dashed with
    triangles when warmstarted, so a gamma's two runs read as a pair."""
    sgd_rates = sorted({r["server_lr"] for r in rows if r["server_optimizer"] == "sgd"})
    gammas = sorted({r["server_lr"] for r in rows if r["server_optimizer"] == "adagrad"})
    styles = []
    for r in rows:
        if r["server_optimizer"] == "sgd":
            color = SGD_COLORS[sgd_rates.index(r["server_lr"]) % len(SGD_COLORS)]
            styles.append({"color": color, "linestyle": "-", "marker": "s"})
            continue
        color = ADAGRAD_COLORS[gammas.index(r["server_lr"]) % len(ADAGRAD_COLORS)]
        warm = bool(r["warmstart_steps"])
        styles.append(
            {"color": color, "linestyle": "--" if warm else "-", "marker": "^" if warm else "o"}
        )
    return styles


def plot_grid(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    figure, (by_time, by_updates) = new_figure(2, panel_in=(6.5, 4.5))
    plot_accuracy(by_time, rows, 0, "time since training started (s)", "vs time")
    plot_accuracy(by_updates, rows, 1, "updates applied by a shard", "vs updates")
    for axes in (by_time, by_updates):
        # plot_accuracy drew one line per row, in order, before the 90% line.
        for line, style in zip(axes.get_lines(), line_styles(rows), strict=False):
            line.set(**style)
    title = f"Downpour vs Downpour+Adagrad: LeNet on digits, {NUM_WORKERS} workers, 2 shards"
    save_figure(figure, path, f"{title}, {args.epochs} epoch(s) of data", legend_columns=3)


def replot(json_path: Path) -> int:
    """Redraw the PNG of an earlier run from its JSON (no training)."""
    record = json.loads(json_path.read_text())
    args = argparse.Namespace(epochs=record["settings"]["epochs"])
    plot_grid(record["rows"], args, json_path.with_suffix(".png"))
    return 0


def table_lines(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["config", "server opt", "server lr", "local lr", "warmstart", "final acc"]
    header += ["best acc", "time to 90% (s)", "updates to 90%", "staleness mean", "wall s"]
    lines = []
    for r in rows:
        cells = [r["label_short"], r["server_optimizer"], f"{r['server_lr']:g}", f"{r['lr']:g}"]
        cells.append(str(r["warmstart_steps"]))
        if "error" in r:
            lines.append([*cells, r["error"], *[""] * 5])
            continue
        time_to = r["time_to_target_s"]
        updates_to = r["updates_to_target"]
        cells += [f"{r['final_acc']:.3f}", f"{r['best_acc']:.3f}"]
        cells += ["not reached" if time_to is None else f"{time_to:.2f}"]
        cells += ["not reached" if updates_to is None else str(updates_to)]
        cells += [f"{r['staleness']['mean']:.2f}", f"{r['wall_s']:.1f}"]
        lines.append(cells)
    return header, lines


def _float_list(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.02,0.05, got {text!r}") from e
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be > 0, got {text!r}")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--sgd-lrs", type=_float_list, default=None, help="default 0.02,0.05")
    parser.add_argument(
        "--adagrad-lrs", type=_float_list, default=None, help="default 0.003,0.01,0.05,0.2"
    )
    parser.add_argument("--warmstart-steps", type=int, default=WARMSTART_STEPS)
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
        "--quick", action="store_true", help="1 epoch, one rate each; results next to the runs"
    )
    parser.add_argument(
        "--replot",
        type=machine.record_file("adagrad_vs_sgd"),
        default=None,
        help="redraw the PNG from a JSON",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    defaults = {"sgd_lrs": [0.02, 0.05], "adagrad_lrs": [0.003, 0.01, 0.05, 0.2], "epochs": 20}
    if args.quick:
        defaults = {"sgd_lrs": [0.05], "adagrad_lrs": [0.2], "epochs": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.warmstart_steps < 1:
        parser.error("--epochs and --warmstart-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    with machine.output_dirs(args, "adagrad_vs_sgd", RESULTS_DIR) as (out, runs_dir):
        rows = run_grid(args, runs_dir)
        name = "adagrad_vs_sgd" + (f"_seed{args.seed}" if args.seed else "")
        stem = out / f"{name}_cpu{os.cpu_count()}_{datetime.date.today():%Y%m%d}"
        settings = {**BASE, "num_workers": NUM_WORKERS, "epochs": args.epochs, "seed": args.seed}
        settings |= {"runs_dir": str(args.runs_dir) if args.runs_dir else None}
        settings |= {"warmstart_steps": args.warmstart_steps}
        record = {"benchmark": "adagrad_vs_sgd", **environment(), "settings": settings}
        record["rows"] = rows
        header, lines = table_lines(rows)
        write_table(stem, "Downpour vs Downpour+Adagrad: LeNet on digits", record, header, lines)
        plot_grid(rows, args, Path(f"{stem}.png"))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
