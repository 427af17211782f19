"""Sandblaster's load balancing: the time of one evaluation (the gradient of the whole batch)
with a 3x slower worker, dynamic portions with backup copies vs a static equal split.

4 worker processes, 2 shard processes, the coordinator's service in this process (see
sandblaster_job.py). The straggler (the last rank) sleeps twice each portion's measured compute
time after that portion, so each of its portions takes 3x. Four configurations, interleaved in
every repeat (their order rotates): {static: one portion per worker, no backups
(``max_holders=1``); dynamic: 10 portions per worker, backups on} x {straggler, none}. Each
session runs one warm-up evaluation and then the timed ones; the headline is the median over
repeats of (static with straggler / dynamic with straggler), each repeat's figures its median.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import math
import os
import signal
import statistics
import sys
from pathlib import Path

import machine
from distbelief.coordinator import BatchPlan
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

logger = logging.getLogger("sandblaster_balance")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 2.0
"""static / dynamic time per evaluation with the straggler that this benchmark expects."""
CONFIGS = ("static_slow", "dynamic_slow", "static_even", "dynamic_even")
LABELS = {
    "static_slow": "static split, no backups",
    "dynamic_slow": "dynamic portions + backups",
    "static_even": "static split, no backups",
    "dynamic_even": "dynamic portions + backups",
}


def session_settings(name: str, args: argparse.Namespace) -> dict:
    dynamic = name.startswith("dynamic")
    straggler = name.endswith("slow")
    return {
        "num_portions": args.portions if dynamic else args.workers,
        "max_holders": 2 if dynamic else 1,
        "slowdowns": {args.workers - 1: args.slowdown} if straggler else {},
    }


def run_session(pool, shards, initial, args, name: str, first_evaluation: int) -> dict:
    """One session of configuration ``name``: a warm-up evaluation, then the timed ones."""
    settings = session_settings(name, args)
    plan = BatchPlan(
        num_examples=len(train_set()),
        num_portions=settings["num_portions"],
        batch_size=args.batch_size,
    )
    evaluations = []
    with Session(
        pool,
        shards,
        initial,
        args.model,
        plan,
        max_holders=settings["max_holders"],
        slowdowns=settings["slowdowns"],
        portions_per_push=args.portions_per_push,
    ) as session:
        for index in range(args.evaluations + 1):
            evaluation = first_evaluation + index
            outcome, seconds, opened_at = session.evaluate(evaluation)
            figures = outcome.figures
            evaluations.append(
                {
                    "evaluation": evaluation,
                    "warm_up": index == 0,
                    "seconds": seconds,
                    "opened_at": opened_at,
                    "open_to_last_commit_s": figures.time_s,
                    "portions_by_worker": figures.portions_by_worker,
                    "backups_issued": figures.backups_issued,
                    "backups_won": figures.backups_won,
                    "duplicates": figures.duplicates,
                }
            )
        commits, commit_s = session.commits, session.commit_s
        results = session.close()
    portions = [p for p in portion_rows(results) if p["evaluation"] >= first_evaluation + 1]
    timed = [e for e in evaluations if not e["warm_up"]]
    return summarize_portions(
        {
            "config": name,
            **{k: v for k, v in settings.items() if k != "slowdowns"},
            "straggler_rank": next(iter(settings["slowdowns"]), None),
            "median_s": statistics.median(e["seconds"] for e in timed),
            "evaluations": evaluations,
            "portions": portions,
            "commits": commits,
            "commit_s": commit_s,
            "worker_figures": {rank: r["figures"] for rank, r in results.items()},
        },
        args,
    )


def run_all(args: argparse.Namespace) -> tuple[list[dict], list[float]]:
    """Every session, and the one-process batch gradient's time measured before each repeat."""
    sessions, references = [], []
    next_evaluation = 1
    initial = seeded_model(args.model, args.seed)
    with ShardHosts(args.shards) as hosts, WorkerPool(args.workers) as pool:
        shards = hosts.start()
        for repeat in range(args.repeats):
            plan = BatchPlan(
                num_examples=len(train_set()), num_portions=1, batch_size=args.batch_size
            )
            references.append(batch_gradient_s(initial, plan))
            order = CONFIGS[repeat % len(CONFIGS) :] + CONFIGS[: repeat % len(CONFIGS)]
            for name in order:
                row = run_session(pool, shards, initial, args, name, next_evaluation)
                next_evaluation += args.evaluations + 1
                row["repeat"] = repeat
                sessions.append(row)
                logger.info(
                    "repeat %d %s: %.3f s per evaluation (load %.1f)",
                    repeat,
                    name,
                    row["median_s"],
                    os.getloadavg()[0],
                )
    return sessions, references


# ---------------------------------------------------------------- summary


def _median_range(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _straggler_portions(evaluation: dict, straggler: int) -> int:
    prefix = f"worker{straggler}-"
    return sum(n for w, n in evaluation["portions_by_worker"].items() if w.startswith(prefix))


def timelines(session: dict, num_workers: int) -> list[dict]:
    """Per timed evaluation of a session: ``head_s`` (opened until the first portion's
    computation began: wake-ups and reading the point), ``tail_s`` (the end of the last
    computation that ended before the close until the close: the last pushes and commits),
    ``busy`` (the workers' compute plus sleep inside the evaluation over workers x its time;
    a backup copy or a straggler may still compute or sleep after the close)."""
    out = []
    for item in session["evaluations"]:
        if item["warm_up"]:
            continue
        opened, closed = item["opened_at"], item["opened_at"] + item["seconds"]
        mine = [p for p in session["portions"] if p["evaluation"] == item["evaluation"]]
        ended = [p["computed_at"] for p in mine if p["computed_at"] <= closed]
        if not ended:
            continue
        spans = [(p["computed_at"] - p["compute_s"], p["computed_at"] + p["slept_s"]) for p in mine]
        worked_s = sum(max(0.0, min(end, closed) - max(start, opened)) for start, end in spans)
        out.append(
            {
                "head_s": min(start for start, _ in spans) - opened,
                "tail_s": closed - max(ended),
                "busy": worked_s / (num_workers * item["seconds"]),
            }
        )
    return out


def gaps_between_portions(session: dict, straggler: int) -> list[float]:
    """Seconds a worker (not the straggler) spent between the end of one portion's compute
    and the start of its next in the same evaluation: reporting it, pushing a bundle, the
    bundle's commit, getting the next task (and waiting for a core meanwhile)."""
    by_worker: dict[tuple[int, int], list[dict]] = {}
    for portion in session["portions"]:
        if portion["rank"] != straggler:
            by_worker.setdefault((portion["rank"], portion["evaluation"]), []).append(portion)
    gaps = []
    for portions in by_worker.values():
        portions.sort(key=lambda p: p["computed_at"])
        for done, following in itertools.pairwise(portions):
            began = following["computed_at"] - following["compute_s"]
            gaps.append(began - done["computed_at"] - done["slept_s"])
    return gaps


def summarize_portions(session: dict, args: argparse.Namespace) -> dict:
    """The session with its portion log (one row per portion computed) replaced by what the
    summary needs from it (the log would make the JSON some 100 times bigger)."""
    session = dict(session)
    portions = session.pop("portions")
    straggler = args.workers - 1
    fast = [p["compute_s"] for p in portions if p["rank"] != straggler]
    gaps = gaps_between_portions({"portions": portions}, straggler)
    session["portion_stats"] = {
        "timelines": timelines({**session, "portions": portions}, args.workers),
        "portions_computed": len(portions),
        "compute_s": sum(p["compute_s"] for p in portions),
        "fast_compute_ms_median": 1000 * statistics.median(fast) if fast else None,
        "gap_ms_median": 1000 * statistics.median(gaps) if gaps else None,
        "straggler_compute_ms": [
            round(1000 * p["compute_s"], 2) for p in portions if p["rank"] == straggler
        ],
    }
    return session


def _median_of(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_config(sessions: list[dict], args: argparse.Namespace) -> dict[str, dict]:
    """Each configuration's time per evaluation and how its work was spread."""
    summary = {}
    straggler = args.workers - 1
    for name in CONFIGS:
        rows = [s for s in sessions if s["config"] == name]
        stats = [s["portion_stats"] for s in rows]
        timed = [e for s in rows for e in s["evaluations"] if not e["warm_up"]]
        committed = sum(sum(e["portions_by_worker"].values()) for e in timed)
        slow = [ms for item in stats for ms in item["straggler_compute_ms"]]
        commits = sum(s["commits"] for s in rows)
        lines = [line for item in stats for line in item["timelines"]]
        summary[name] = {
            **{
                f"{key}_median": statistics.median(line[key] for line in lines)
                for key in ("head_s", "tail_s", "busy")
            },
            "seconds": _median_range([s["median_s"] for s in rows]),
            "open_to_last_commit_s": statistics.median(e["open_to_last_commit_s"] for e in timed),
            "straggler_share_of_committed": sum(_straggler_portions(e, straggler) for e in timed)
            / committed,
            "backups_issued_per_evaluation": statistics.mean(e["backups_issued"] for e in timed),
            "backups_won_per_evaluation": statistics.mean(e["backups_won"] for e in timed),
            "duplicates_per_evaluation": statistics.mean(e["duplicates"] for e in timed),
            "portions_computed_per_evaluation": sum(i["portions_computed"] for i in stats)
            / len(timed),
            "fast_portion_compute_ms": _median_of([i["fast_compute_ms_median"] for i in stats]),
            "gap_between_portions_ms": _median_of([i["gap_ms_median"] for i in stats]),
            "straggler_portion_compute_ms": [min(slow), statistics.median(slow), max(slow)],
            "compute_s_per_evaluation": sum(i["compute_s"] for i in stats) / len(timed),
            "commit_ms_mean": 1000 * sum(s["commit_s"] for s in rows) / max(1, commits),
            "commits_per_evaluation": commits / (len(rows) * (args.evaluations + 1)),
        }
    return summary


RATIOS = {
    "static_vs_dynamic_straggler": ("static_slow", "dynamic_slow"),
    "static_vs_dynamic_even": ("static_even", "dynamic_even"),
    "straggler_cost_static": ("static_slow", "static_even"),
    "straggler_cost_dynamic": ("dynamic_slow", "dynamic_even"),
}
"""name -> (numerator, denominator): each repeat's ratio of median times, then their median."""


def ratios(sessions: list[dict], repeats: int) -> dict[str, dict]:
    out = {}
    for name, (top, bottom) in RATIOS.items():
        values = []
        for repeat in range(repeats):
            times = {s["config"]: s["median_s"] for s in sessions if s["repeat"] == repeat}
            values.append(times[top] / times[bottom])
        out[name] = {**_median_range(values), "per_repeat": values}
    return out


def report(stem: Path, record: dict, args: argparse.Namespace) -> str:
    summary, found = record["per_config"], record["ratios"]
    header = ["configuration", "straggler", "portions", "backups", "s per evaluation: median"]
    header += ["min-max", "straggler's share", "backups issued / won", "duplicates"]
    cells = []
    for name in CONFIGS:
        item = summary[name]
        seconds = item["seconds"]
        share = item["straggler_share_of_committed"]
        cells.append(
            [
                LABELS[name],
                "3x" if name.endswith("slow") else "none",
                str(args.portions if name.startswith("dynamic") else args.workers),
                "on" if name.startswith("dynamic") else "off",
                f"{seconds['median']:.3f}",
                f"{seconds['min']:.3f}-{seconds['max']:.3f}",
                "-" if share is None else f"{share:.2f}",
                f"{item['backups_issued_per_evaluation']:.1f} / "
                f"{item['backups_won_per_evaluation']:.1f}",
                f"{item['duplicates_per_evaluation']:.1f}",
            ]
        )
    headline = found["static_vs_dynamic_straggler"]
    verdict = "met" if headline["median"] >= TARGET_RATIO else "not met"
    lines = [
        f"{args.model} on the whole of {DATASET}"
        if args.batch_size is None
        else f"{args.model} on a {args.batch_size}-example sample of {DATASET}",
        f", {args.workers} workers (rank {args.workers - 1} slowed {args.slowdown:g}x when marked),"
        f" {args.shards} shards, a worker pushes every {args.portions_per_push} portions;"
        f" {args.repeats} repeats x {args.evaluations} timed evaluations per configuration.",
        "",
        "Ratios (median over repeats of each repeat's ratio of median times, min-max):",
        "",
    ]
    for name, value in found.items():
        lines.append(f"- {name}: **{value['median']:.2f}** ({value['min']:.2f}-{value['max']:.2f})")
    lines.append("")
    lines.append(
        f"Target: static / dynamic with the straggler >= {TARGET_RATIO:g}: {verdict} "
        f"({headline['median']:.2f})."
    )
    lines += ["", "What limits it (from this run's figures):", "", *limits(record, args)]
    return machine.write_report(
        stem,
        record,
        "Sandblaster load balancing: dynamic portions + backups vs a static split",
        "".join(lines[:2]) + "\n" + "\n".join(lines[2:]),
        header,
        cells,
    )


def limits(record: dict, args: argparse.Namespace) -> list[str]:
    """The figures that bound the dynamic configuration's time, as markdown list items."""
    summary = record["per_config"]
    reference = record["one_process_gradient_s"]["median"]
    cores = min(os.cpu_count() or 1, args.workers)
    dynamic, static = summary["dynamic_slow"], summary["static_slow"]
    even_dynamic = summary["dynamic_even"]
    low, middle, high = static["straggler_portion_compute_ms"]
    even = {name: summary[f"{name}_even"]["seconds"]["median"] for name in ("static", "dynamic")}
    capacity = args.workers - 1 + 1 / args.slowdown
    ideal_share = (1 / args.slowdown) / capacity
    dynamic_s = dynamic["seconds"]["median"]
    return [
        f"- The machine: one process (1 thread) computes the whole batch's gradient in "
        f"{reference:.3f} s; spread perfectly over {cores} cores that is {reference / cores:.3f}"
        f" s. Dynamic with the straggler took {dynamic_s:.3f} s "
        f"({dynamic_s / (reference / cores):.2f}x that bound), static "
        f"{static['seconds']['median']:.3f} s; without the straggler the static split took "
        f"{even['static']:.3f} s ({even['static'] / (reference / cores):.2f}x the bound): "
        f"that part of the gap is the other load on the machine and {args.workers} workers "
        f"taking turns on {cores} cores, not the balancing.",
        f"- Where a dynamic evaluation's time goes (medians): {1000 * dynamic['head_s_median']:.0f}"
        f" ms from opening it to the first computation (wake-ups, reading the point), "
        f"{1000 * dynamic['tail_s_median']:.0f} ms from the last computation's end to its close"
        f" (the last pushes and commits); the workers computed or slept "
        f"{100 * dynamic['busy_median']:.0f}% of workers x time (static with the straggler: "
        f"{100 * static['busy_median']:.0f}%, its tail {1000 * static['tail_s_median']:.0f} ms"
        f" is the straggler's sleep).",
        f"- Per-portion cost: without a straggler, {args.portions} portions took "
        f"{even['dynamic']:.3f} s per evaluation and {args.workers} portions "
        f"{even['static']:.3f} s (ratio {even['dynamic'] / even['static']:.2f}): each portion "
        f"is a work request, 1/{args.portions_per_push} of a bundle push to every shard, a "
        f"bundle report and a commit program; {dynamic['commits_per_evaluation']:.1f} commits "
        f"per evaluation (static {static['commits_per_evaluation']:.1f}), "
        f"{dynamic['commit_ms_mean']:.1f} ms each on the coordinator, one at a time. A fast "
        f"worker spent a median {even_dynamic['gap_between_portions_ms']:.1f} ms between two "
        f"portions (no straggler) against {even_dynamic['fast_portion_compute_ms']:.1f} ms "
        f"computing one.",
        f"- Balance: the straggler committed {dynamic['straggler_share_of_committed']:.2f} of "
        f"the portions (its share of the capacity: {ideal_share:.2f}); backups issued / won per "
        f"evaluation {dynamic['backups_issued_per_evaluation']:.1f} / "
        f"{dynamic['backups_won_per_evaluation']:.1f}, duplicates "
        f"{dynamic['duplicates_per_evaluation']:.1f}: a backup copy cuts the tail of the "
        f"straggler's last portion instead of waiting {args.slowdown:g}x a portion.",
        f"- Contention: the median portion on a fast worker computed in "
        f"{dynamic['fast_portion_compute_ms']:.1f} ms (dynamic) and a quarter of the batch in "
        f"{static['fast_portion_compute_ms']:.1f} ms (static): {args.workers} workers, "
        f"{args.shards} shards and the coordinator share {os.cpu_count()} cores, and the "
        f"straggler's sleep is twice its contended compute time. In the static split the "
        f"straggler computed its quarter in {low:.0f}-{high:.0f} ms (median {middle:.0f}): "
        f"how the kernel shares the cores with it decides its sleep, and so the static time.",
    ]


# ---------------------------------------------------------------- command line


def _slowdown(text: str) -> float:
    """An argparse ``type``: the straggler's factor, a finite number >= 1 (nan passed every
    comparison, and inf slept without end)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1, got {text!r}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="lenet", choices=("lenet", "mlp"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shards", type=machine.at_least(1), default=2)
    parser.add_argument("--portions", type=int, default=40, help="dynamic configurations")
    parser.add_argument("--portions-per-push", type=machine.at_least(1), default=2)
    parser.add_argument("--slowdown", type=_slowdown, default=3.0)
    parser.add_argument(
        "--batch-size", type=machine.at_least(1), default=None, help="default: the whole set"
    )
    parser.add_argument(
        "--repeats", type=machine.at_least(1), default=None, help="default 7 (--quick: 1)"
    )
    parser.add_argument(
        "--evaluations", type=machine.at_least(1), default=None, help="timed per session (4)"
    )
    parser.add_argument("--seed", type=machine.seed, default=0)
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="file stem; - writes nothing"
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 evaluations; no files")
    parser.add_argument(
        "--report",
        type=machine.record_file("sandblaster_balance"),
        default=None,
        help="rewrite a JSON's md only",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 7
    if args.evaluations is None:
        args.evaluations = 2 if args.quick else 4
    if args.out is None:
        date = datetime.date.today().strftime("%Y%m%d")
        name = f"sandblaster_balance_cpu{os.cpu_count()}_{date}"
        args.out = Path("-") if args.quick else RESULTS_DIR / name
    if args.workers < 2 or args.portions < args.workers:
        parser.error("need --workers >= 2 and --portions >= --workers")
    return args


def report_again(json_path: Path) -> int:
    """Rewrite an earlier run's summary, md and JSON from the sessions its JSON holds (no
    measuring); its command and machine record stay as they were."""
    record = json.loads(json_path.read_text())
    args = argparse.Namespace(**record["settings"])
    sessions = [summarize_portions(s, args) if "portions" in s else s for s in record["sessions"]]
    record["sessions"] = sessions
    record["per_config"] = per_config(sessions, args)
    record["ratios"] = ratios(sessions, args.repeats)
    print(report(json_path.with_suffix(""), record, args))
    return 0


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process started here.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    args = parse_args(argv)
    if args.report is not None:
        return report_again(args.report)
    logging.getLogger("distbelief").setLevel(logging.WARNING)
    sessions, references = run_all(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quick", "report")}
    record = {"benchmark": "sandblaster_balance", **machine.environment(), "settings": settings}
    record |= {
        "per_config": per_config(sessions, args),
        "ratios": ratios(sessions, args.repeats),
        "one_process_gradient_s": _median_range(references) | {"per_repeat": references},
        "sessions": sessions,
    }
    print(report(args.out, record, args))
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
