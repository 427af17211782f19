"""Evaluator cost: the workers' training steps/s with the evaluator on (every 0.5 s) vs off.

Runs the same short ``distbelief train`` job (a fresh launcher process each time) with
``--eval-every 0.5`` and with ``--no-eval``, in interleaved repeats, and reads each run's
``metrics.csv``: a run's throughput is the sum over workers of (last step - first step) /
(last time - first time) of that worker's records, so process start-up and the final
evaluation are not counted. The printed ratio (with eval / without) is the evaluator's cost.
First it times single evaluations against in-process shards: the evaluator's CPU share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import machine
from distbelief.client import ParameterServerClient
from distbelief.config import DATASET_NAMES, MODEL_NAMES, JobConfig
from distbelief.data import load_dataset
from distbelief.evaluator import PSEvaluator
from distbelief.files import write_text_atomic
from distbelief.server import ParameterShard, ShardService
from distbelief.server.optimizers import server_optimizer_from_config
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.telemetry import read_metrics
from distbelief.wire import serve
from distbelief.worker import build_replica

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUN_TIMEOUT_S = 600.0
MODES = {"eval": ["--eval-every", "{eval_every_s}"], "no_eval": ["--no-eval"]}


def _train_args(args: argparse.Namespace, mode: str, out_dir: Path) -> list[str]:
    flags = [flag.format(eval_every_s=args.eval_every_s) for flag in MODES[mode]]
    return [
        sys.executable,
        "-m",
        "distbelief",
        "train",
        "--model",
        args.model,
        "--dataset",
        args.dataset,
        "--workers",
        str(args.workers),
        "--shards",
        str(args.shards),
        "--steps",
        str(args.steps),
        "--out",
        str(out_dir),
        *flags,
    ]


def workers_steps_per_s(metrics_path: Path) -> tuple[float, int]:
    """Summed steps/s of the workers of one run, and how many evaluations it recorded."""
    records = read_metrics(metrics_path)
    first: dict[int, tuple[float, int]] = {}
    last: dict[int, tuple[float, int]] = {}
    for record in records:
        if record["role"] == "worker" and record["step"] is not None:
            point = (float(record["time_s"]), int(record["step"]))
            first.setdefault(record["rank"], point)
            last[record["rank"]] = point
    total = 0.0
    for rank, (first_time_s, first_step) in first.items():
        last_time_s, last_step = last[rank]
        if last_time_s > first_time_s:
            total += (last_step - first_step) / (last_time_s - first_time_s)
    num_evals = sum(1 for record in records if record["role"] == "evaluator")
    return total, num_evals


def run_once(args: argparse.Namespace, mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"evalcost-{mode}-") as tmp:
        out_dir = Path(tmp) / "run"
        command = _train_args(args, mode, out_dir)
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        steps_per_s, num_evals = workers_steps_per_s(out_dir / "metrics.csv")
        summary = json.loads((out_dir / "summary.json").read_text())
    return {
        "mode": mode,
        "workers_steps_per_s": round(steps_per_s, 2),
        "num_evaluations": num_evals,
        "final_test_accuracy": summary["final"].get("test_accuracy"),
    }


def measure(args: argparse.Namespace) -> dict:
    runs = []
    for repeat in range(args.repeats):
        # Alternate which mode goes first, so a drifting machine does not favour one.
        order = ["eval", "no_eval"] if repeat % 2 == 0 else ["no_eval", "eval"]
        for mode in order:
            run = run_once(args, mode)
            runs.append({"repeat": repeat, **run})
            print(
                f"repeat {repeat} {mode:>7}: {run['workers_steps_per_s']:8.1f} steps/s "
                f"({run['num_evaluations']} evaluations)",
                flush=True,
            )
    medians = {
        mode: statistics.median(r["workers_steps_per_s"] for r in runs if r["mode"] == mode)
        for mode in MODES
    }
    ratio = medians["eval"] / medians["no_eval"]
    # Each repeat's two runs saw about the same machine: their ratio shows the spread.
    by_repeat: dict[int, dict[str, float]] = {}
    for run in runs:
        by_repeat.setdefault(run["repeat"], {})[run["mode"]] = run["workers_steps_per_s"]
    pair_ratios = [round(pair["eval"] / pair["no_eval"], 3) for pair in by_repeat.values()]
    print(
        f"median workers' steps/s: eval every {args.eval_every_s:g}s {medians['eval']:.1f}, "
        f"no eval {medians['no_eval']:.1f}; ratio {ratio:.3f} ({(1 - ratio) * 100:+.1f}% cost); "
        f"per repeat {pair_ratios}"
    )
    return {
        "runs": runs,
        "median_steps_per_s": medians,
        "ratio_eval_vs_no_eval": round(ratio, 3),
        "ratio_per_repeat": pair_ratios,
    }


def measure_evaluation_s(args: argparse.Namespace, num_evaluations: int = 20) -> dict:
    """Wall time of one evaluation (pull from in-process shards + test-set forward pass) on
    one torch thread, as the evaluator runs it: its CPU cost, free of the job's noise."""
    torch.set_num_threads(1)
    config = JobConfig.from_fields(
        {"model.name": args.model, "data.name": args.dataset, "cluster.num_shards": args.shards}
    )
    servers = [
        serve(
            "tcp://127.0.0.1:0",
            ShardService(
                ParameterShard(i, args.shards, server_optimizer_from_config(config.server))
            ),
        )
        for i in range(args.shards)
    ]
    addresses = [server.address for server in servers]
    try:
        test_set = load_dataset(args.dataset, split="test")
        model = build_replica(config, test_set.input_shape, test_set.num_classes)
        layout = FlatLayout(tensor_specs(model.named_parameters()))
        client = ParameterServerClient(addresses, layout.specs)
        client.handshake(layout.flatten([p.detach() for p in model.parameters()]))
        client.close()
        evaluator = PSEvaluator(config, addresses)
        durations_s = []
        for _ in range(num_evaluations):
            start_s = time.perf_counter()
            evaluator.evaluate()
            durations_s.append(time.perf_counter() - start_s)
        evaluator.close()
    finally:
        for server in servers:
            server.stop()
    median_s = statistics.median(durations_s)
    print(
        f"one evaluation: median {median_s * 1e3:.1f} ms, min {min(durations_s) * 1e3:.1f} ms; "
        f"{median_s / args.eval_every_s * 100:.1f}% of one core at one per {args.eval_every_s:g}s"
    )
    return {
        "evaluation_ms_median": round(median_s * 1e3, 2),
        "evaluation_ms_min": round(min(durations_s) * 1e3, 2),
        "evaluator_core_share": round(median_s / args.eval_every_s, 4),
    }


def save_results(path: Path, args: argparse.Namespace, result: dict) -> None:
    record = {
        "benchmark": "evaluator_cost",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "job": {
            "model": args.model,
            "dataset": args.dataset,
            "workers": args.workers,
            "shards": args.shards,
            "steps_per_worker": args.steps,
            "eval_every_s": args.eval_every_s,
        },
        "repeats": args.repeats,
        **result,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="lenet", choices=MODEL_NAMES)
    parser.add_argument("--dataset", default="digits", choices=DATASET_NAMES)
    parser.add_argument("--workers", type=machine.at_least(1), default=2)
    parser.add_argument("--shards", type=machine.at_least(1), default=2)
    parser.add_argument(
        "--steps", type=machine.at_least(1), default=1000, help="steps per worker and run"
    )
    parser.add_argument("--eval-every", dest="eval_every_s", type=machine.above_zero, default=0.5)
    parser.add_argument("--repeats", type=machine.at_least(1), default=3, help="runs of each mode")
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="JSON path ('-': do not write)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.steps < 50:
        parser.error(f"--steps must be >= 50 for a meaningful rate, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    result = {**measure_evaluation_s(args), **measure(args)}
    # Other jobs on the machine move absolute numbers; the load average says how busy it was.
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    day = datetime.date.today().strftime("%Y%m%d")
    default = RESULTS_DIR / f"evaluator_cost_cpu{os.cpu_count()}_{day}.json"
    out = args.out if args.out is not None else default
    if str(out) != "-":
        save_results(out, args, result)
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
