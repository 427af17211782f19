"""Sandblaster L-BFGS per iteration: the coordinator's round trips to the shards for history
sizes m = 2, 5, 10, 20, and where an iteration's time goes: the workers' gradient computation
vs everything around it (the coordinator's vector programs, the bundles' commits, its scalar
math, the evaluations' requests and pushes).

The coordinator (``SandblasterLBFGS`` over ``CoordinatorService``) runs in this process, the
shards and the workers in processes (see sandblaster_job.py); each (model, m) is a fresh pair of
shards initialised with the same seeded model. Round trips are counted by the coordinator
(``IterationRecord.num_programs``, checked against the programs this script saw); each portion's
compute time comes from the workers' ``after_portion`` hook. Both sides are measured in the
same iterations, so the split is a ratio within one run.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import machine
from distbelief.coordinator import BatchPlan, LBFGSSettings, SandblasterLBFGS
from sandblaster_job import (
    DATASET,
    Session,
    ShardHosts,
    WorkerPool,
    batch_gradient_s,
    portion_rows,
    seeded_model,
    train_set,
)

logger = logging.getLogger("sandblaster_round_trips")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROGRAMS_PER_EVALUATION = 2
"""Each evaluation: one program opens it (and builds the trial point), one closes, scales and
takes its dot products."""


class IterationTimer:
    """Wraps the session's evaluate: records each evaluation's number and time, by iteration."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.iteration = 0
        self.evaluations: dict[int, list[int]] = {}
        self.seconds: dict[int, float] = {}

    def __call__(self, evaluation: int, point: str):
        started = time.perf_counter()
        outcome = self.session.lbfgs_evaluate(evaluation, point)
        self.evaluations.setdefault(self.iteration, []).append(evaluation)
        self.seconds[self.iteration] = (
            self.seconds.get(self.iteration, 0.0) + time.perf_counter() - started
        )
        return outcome


def run_lbfgs(pool, hosts, args, model: str, history: int) -> dict:
    """One L-BFGS run of ``args.iterations`` on fresh shards; one row per iteration."""
    initial = seeded_model(model, args.seed)
    plan = BatchPlan(
        num_examples=len(train_set()),
        num_portions=args.portions_per_worker * args.workers,
        batch_size=args.batch_size,
    )
    rows = []
    with Session(pool, hosts.start(), initial, model, plan, max_holders=2) as session:
        timer = IterationTimer(session)
        settings = LBFGSSettings(history_size=history, line_search=args.line_search)
        lbfgs = SandblasterLBFGS(session.timed, timer, settings)
        for iteration in range(args.iterations + 1):
            timer.iteration = iteration
            before = (session.timed.calls, session.timed.seconds, session.timed.instructions)
            commits_before = (session.commits, session.commit_s)
            started = time.perf_counter()
            record = lbfgs.start() if iteration == 0 else lbfgs.step()
            wall_s = time.perf_counter() - started
            calls = session.timed.calls - before[0]
            assert calls == record.num_programs, (calls, record.num_programs)
            rows.append(
                {
                    "iteration": record.iteration,
                    "loss": record.loss,
                    "num_programs": record.num_programs,
                    "num_evaluations": record.num_evaluations,
                    "history_pairs": len(lbfgs.state.history),
                    "instructions": session.timed.instructions - before[2],
                    "wall_s": wall_s,
                    "programs_s": session.timed.seconds - before[1],
                    "evaluate_s": timer.seconds.get(iteration, 0.0),
                    "commits": session.commits - commits_before[0],
                    "commit_s": session.commit_s - commits_before[1],
                    "evaluations": timer.evaluations.get(iteration, []),
                }
            )
            if lbfgs.stop_reason is not None:
                logger.info("m=%d stopped at %d: %s", history, iteration, lbfgs.stop_reason)
                break
        results = session.close()
    add_compute(rows, portion_rows(results), args.workers)
    return {"model": model, "history": history, "stop_reason": lbfgs.stop_reason, "rows": rows}


def add_compute(rows: list[dict], portions: list[dict], num_workers: int) -> None:
    """Each iteration's portions: their compute time summed, and per worker (the wall time
    that compute takes when spread evenly over the workers), and what is left of the wall."""
    by_evaluation: dict[int, list[dict]] = {}
    for portion in portions:
        by_evaluation.setdefault(portion["evaluation"], []).append(portion)
    for row in rows:
        mine = [p for e in row["evaluations"] for p in by_evaluation.get(e, [])]
        row["portions_computed"] = len(mine)
        row["compute_s"] = sum(p["compute_s"] for p in mine)
        row["compute_per_worker_s"] = row["compute_s"] / num_workers
        row["outside_s"] = row["wall_s"] - row["compute_per_worker_s"]
        row["scalar_s"] = row["wall_s"] - row["programs_s"] - row["evaluate_s"]


# ---------------------------------------------------------------- summary


def summarize(run: dict) -> dict:
    """Medians over the iterations after the first (iteration 1 builds no history pair)."""
    rows = [r for r in run["rows"] if r["iteration"] >= 2]
    full = [r for r in rows if r["history_pairs"] == run["history"]]

    def median(key: str, chosen: list[dict] = rows) -> float | None:
        return statistics.median(r[key] for r in chosen) if chosen else None

    programs = [r["num_programs"] for r in rows]
    fixed = [r["num_programs"] - PROGRAMS_PER_EVALUATION * r["num_evaluations"] for r in rows]
    compute = sum(r["compute_per_worker_s"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    return {
        "model": run["model"],
        "history": run["history"],
        "iterations": len(rows),
        "iterations_with_full_history": len(full),
        "programs_min": min(programs),
        "programs_median": statistics.median(programs),
        "programs_max": max(programs),
        "programs_besides_evaluations": sorted(set(fixed)),
        "evaluations_per_iteration": statistics.mean(r["num_evaluations"] for r in rows),
        "instructions_median": median("instructions"),
        "instructions_full_history_median": median("instructions", full),
        "wall_s_median": median("wall_s"),
        "programs_s_median": median("programs_s"),
        "programs_s_full_history_median": median("programs_s", full),
        "commit_s_median": median("commit_s"),
        "scalar_s_median": median("scalar_s"),
        "evaluate_s_median": median("evaluate_s"),
        "compute_per_worker_s_median": median("compute_per_worker_s"),
        "outside_over_compute": (wall - compute) / compute if compute else None,
        "final_loss": run["rows"][-1]["loss"],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def report(stem: Path, record: dict, args: argparse.Namespace) -> str:
    header = ["model", "m", "iterations (full history)", "round trips / iteration: median"]
    header += ["min-max", "besides 2 per evaluation", "evaluations / iteration"]
    header += ["instructions / iteration (full history)", "vector programs ms (full history)"]
    header += ["wall ms", "gradient compute ms (per worker)", "commits ms"]
    header += ["coordinator scalar ms", "outside / compute"]
    cells = []
    for item in record["summary"]:
        cells.append(
            [
                item["model"],
                str(item["history"]),
                f"{item['iterations']} ({item['iterations_with_full_history']})",
                f"{item['programs_median']:g}",
                f"{item['programs_min']}-{item['programs_max']}",
                ", ".join(str(v) for v in item["programs_besides_evaluations"]),
                f"{item['evaluations_per_iteration']:.2f}",
                f"{item['instructions_median']:g} ({item['instructions_full_history_median']:g})",
                f"{_ms(item['programs_s_median'])} ({_ms(item['programs_s_full_history_median'])})",
                _ms(item["wall_s_median"]),
                _ms(item["compute_per_worker_s_median"]),
                _ms(item["commit_s_median"]),
                _ms(item["scalar_s_median"]),
                f"{item['outside_over_compute']:.2f}",
            ]
        )
    references = ", ".join(f"{m} {s:.3f} s" for m, s in record["one_process_gradient_s"].items())
    batch = "the whole set" if args.batch_size is None else f"{args.batch_size} examples"
    description = "\n".join(
        [
            f"{DATASET}, batch {batch}, {args.workers} workers, {args.shards} shards, "
            f"{args.portions_per_worker * args.workers} portions, line search "
            f"{args.line_search}, {args.iterations} iterations per (model, m); medians over "
            f"iterations 2 and up (iteration 1 builds no history pair). One process (1 thread) "
            f"computes the whole batch's gradient in: {references}.",
            "",
            "- round trips: coordinator-to-shard programs per iteration (the coordinator's "
            "count, commits of bundles excluded); 'besides 2 per evaluation': that count minus "
            "two per objective evaluation (the set of values seen). For comparison (arithmetic, "
            "not measured): a two-loop recursion run on the shards' vectors needs each "
            "alpha_i / beta_i before the next update of the direction, so about 2m dependent "
            "round trips per iteration (40 at m = 20) on top of the evaluations'.",
            "- instructions and vector-program time grow with m (the new pair's dot products "
            "with the history and the gradient: 6m + 5 dots in one program); '(full history)': "
            "medians over the iterations that held m pairs.",
            "- gradient compute (per worker): the portions' compute time of the iteration's "
            "evaluations, summed over workers and divided by their number.",
            "- outside / compute: (sum of wall - sum of compute per worker) / sum of compute "
            "per worker over the iterations: the coordinator's programs, the commits, its "
            "scalar math, the work requests, point reads, bundle pushes and idle waits.",
            "- commits run on the coordinator's service threads while other workers compute "
            "(they overlap the compute column); vector programs and scalar math do not.",
        ]
    )
    return machine.write_report(
        stem,
        record,
        "Sandblaster L-BFGS: round trips per iteration and time outside the gradient",
        description,
        header,
        cells,
    )


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like 2,5,10, got {text!r}") from e
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--models", default="mlp,lenet", help="comma-separated (mlp,lenet)")
    parser.add_argument("--histories", type=_int_list, default=None, help="default 2,5,10,20")
    parser.add_argument(
        "--iterations", type=machine.at_least(2), default=None, help="per run (default 30)"
    )
    parser.add_argument("--workers", type=machine.at_least(1), default=2)
    parser.add_argument("--shards", type=machine.at_least(1), default=2)
    parser.add_argument("--portions-per-worker", type=machine.at_least(1), default=10)
    parser.add_argument(
        "--batch-size", type=machine.at_least(1), default=None, help="default: the whole set"
    )
    parser.add_argument("--line-search", default="strong-wolfe", choices=("strong-wolfe", "fixed"))
    parser.add_argument("--seed", type=machine.seed, default=0)
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="file stem; - writes nothing"
    )
    parser.add_argument("--quick", action="store_true", help="m 2,5, 6 iterations; no files")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.models = [name for name in args.models.split(",") if name]
    if not args.models or not set(args.models) <= {"mlp", "lenet"}:
        parser.error(
            f"argument --models: must name mlp and/or lenet, got {','.join(args.models)!r}"
        )
    if args.histories is None:
        args.histories = [2, 5] if args.quick else [2, 5, 10, 20]
    if args.iterations is None:
        args.iterations = 6 if args.quick else 30
    if args.out is None:
        date = datetime.date.today().strftime("%Y%m%d")
        name = f"sandblaster_round_trips_cpu{os.cpu_count()}_{date}"
        args.out = Path("-") if args.quick else RESULTS_DIR / name
    return args


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("distbelief").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process started here.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    args = parse_args(argv)
    runs, references = [], {}
    with ShardHosts(args.shards) as hosts, WorkerPool(args.workers) as pool:
        for model in args.models:
            plan = BatchPlan(
                num_examples=len(train_set()), num_portions=1, batch_size=args.batch_size
            )
            references[model] = batch_gradient_s(seeded_model(model, args.seed), plan)
            for history in args.histories:
                runs.append(run_lbfgs(pool, hosts, args, model, history))
                item = summarize(runs[-1])
                logger.info(
                    "%s m=%d: %g round trips per iteration, outside/compute %.2f (load %.1f)",
                    model,
                    history,
                    item["programs_median"],
                    item["outside_over_compute"],
                    os.getloadavg()[0],
                )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quick")}
    record = {"benchmark": "sandblaster_round_trips", **machine.environment(), "settings": settings}
    record |= {
        "one_process_gradient_s": references,
        "summary": [summarize(run) for run in runs],
        "runs": runs,
    }
    print(report(args.out, record, args))
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
