"""Start-up time of the ``distbelief`` command against ``python -c "import torch"`` on the same
machine, in one invocation: ``--help``, ``train --help``, launching ``distbelief train`` to
its first worker step, and a standalone ``distbelief ps`` (as started on each host of a
multi-host job) to its answer to a worker's first INIT.

Owns the timings and the md/json report. The first step's time is read from the run itself:
the launch-to-first-row wall time of metrics.csv minus that row's ``time_s`` (seconds since the
first worker started training), polled every 10 ms. CPU seconds are the whole machine's (from
/proc/stat) while ``import torch`` and the job run: every process of the job counts, and so does
anything else running, so they mean something on an otherwise idle machine only. Repeats
interleave the commands, so a busy phase of a shared machine hits each alike; medians are
reported.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import machine
from distbelief.client import ParameterServerClient
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.telemetry import read_metrics

logger = logging.getLogger("startup")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLI = [sys.executable, "-m", "distbelief"]
RUN_TIMEOUT_S = 300.0
"""Longest one command may take before it is stopped as hung."""
POLL_S = 0.01
FIRST_STEP_TARGET = 2.0
"""Launch to first worker step, as a multiple of ``import torch``: at most this."""
HELP_TARGET_S = 0.5
TRAIN_ARGS = ("train", "--steps", "30", "--eval-every", "1")
SHARD_ARGS = ("ps", "--shard-id", "0", "--num-shards", "1", "--bind", "tcp://127.0.0.1:0")
SHARD_ADDRESS_PREFIX = "serving shard 0 at "
SHARD_MODEL_NUMEL = 1000
CLIENT_TIMEOUT_S = 60.0


def machine_cpu_s() -> float:
    """CPU seconds every core of this machine has spent busy since boot (0.0 without /proc)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    idle_and_iowait = fields[3] + fields[4]
    return (sum(fields[:8]) - idle_and_iowait) / os.sysconf("SC_CLK_TCK")


def time_command(args: list[str]) -> float:
    """Wall seconds of one command run to its end (its output discarded).

    Raises:
        subprocess.TimeoutExpired: it ran past RUN_TIMEOUT_S.
        subprocess.CalledProcessError: it failed.
    """
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, timeout=RUN_TIMEOUT_S)
    return time.perf_counter() - started


def _first_worker_row(metrics: Path) -> dict | None:
    if not metrics.is_file():
        return None
    try:
        rows = read_metrics(metrics)
    except ValueError:  # the header or a row is being written right now
        return None
    return next((row for row in rows if row["role"] == "worker"), None)


def time_first_step(run_dir: Path) -> dict:
    """Launches ``distbelief train``; returns seconds from launch to its first worker step and
    to the end of the job.

    Raises:
        TimeoutError: no worker row within RUN_TIMEOUT_S, or the job did not end in it.
        RuntimeError: the job failed.
    """
    started = time.time()
    process = subprocess.Popen(
        [*CLI, *TRAIN_ARGS, "--out", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (row := _first_worker_row(run_dir / "metrics.csv")) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"no worker row in {run_dir / 'metrics.csv'}")
            time.sleep(POLL_S)
        first_step_s = time.time() - row["time_s"] - started
        _, err = process.communicate(timeout=RUN_TIMEOUT_S)
        if process.returncode != 0:
            raise RuntimeError(f"distbelief train failed: {err[-2000:]}")
        return {"first_step_s": first_step_s, "job_s": time.time() - started}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _shard_address(process: subprocess.Popen) -> str:
    """The address ``distbelief ps`` prints; each wait for output is bounded (``stdout`` is an
    unbuffered pipe, so select sees every byte not read yet)."""
    assert process.stdout is not None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([process.stdout], [], [], remaining)[0]:
            break
        line = process.stdout.readline().decode(errors="replace")
        if not line:
            break  # the shard exited
        if SHARD_ADDRESS_PREFIX in line:
            return line.split(SHARD_ADDRESS_PREFIX, 1)[1].split()[0]
    raise TimeoutError("distbelief ps did not say where it serves")


def time_shard_first_init() -> dict:
    """Starts ``distbelief ps``; returns seconds from launch to its address line and to its
    answer to a worker's first INIT (a 1000-element model), and the machine's CPU seconds
    until then (this process's client side included: a handshake, torch already loaded).

    Raises:
        TimeoutError: the shard did not print its address within RUN_TIMEOUT_S.
    """
    specs = tensor_specs([("weights", torch.zeros(SHARD_MODEL_NUMEL))])
    layout = FlatLayout(specs)
    cpu_before, started = machine_cpu_s(), time.time()
    process = subprocess.Popen(
        [*CLI, *SHARD_ARGS, "--no-auth"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )
    try:
        address = _shard_address(process)
        serving_s = time.time() - started
        client = ParameterServerClient([address], specs, timeout_s=CLIENT_TIMEOUT_S)
        try:
            client.handshake(layout.allocate())
        finally:
            client.close()
        first_init_s = time.time() - started
        cpu_s = machine_cpu_s() - cpu_before
    finally:
        process.terminate()
        process.wait(RUN_TIMEOUT_S)
        if process.stdout is not None:
            process.stdout.close()
    return {"serving_s": serving_s, "first_init_s": first_init_s, "cpu_s": cpu_s}


def measure(repeats: int, runs_dir: Path) -> dict[str, list[float]]:
    """Every measurement ``repeats`` times, interleaved."""
    times: dict[str, list[float]] = {
        key: []
        for key in (
            "import_torch",
            "help",
            "train_help",
            "first_step",
            "job",
            "shard_serving",
            "shard_first_init",
            "import_torch_cpu",
            "job_cpu",
            "shard_first_init_cpu",
        )
    }
    for repeat in range(repeats):
        cpu_before = machine_cpu_s()
        times["import_torch"].append(time_command([sys.executable, "-c", "import torch"]))
        times["import_torch_cpu"].append(machine_cpu_s() - cpu_before)
        times["help"].append(time_command([*CLI, "--help"]))
        times["train_help"].append(time_command([*CLI, "train", "--help"]))
        cpu_before = machine_cpu_s()
        run = time_first_step(runs_dir / f"run{repeat}")
        times["job_cpu"].append(machine_cpu_s() - cpu_before)
        times["first_step"].append(run["first_step_s"])
        times["job"].append(run["job_s"])
        shard = time_shard_first_init()
        times["shard_serving"].append(shard["serving_s"])
        times["shard_first_init"].append(shard["first_init_s"])
        times["shard_first_init_cpu"].append(shard["cpu_s"])
        logger.info("repeat %d: %s", repeat, {k: round(v[-1], 2) for k, v in times.items()})
    return times


def summarize(times: dict[str, list[float]]) -> dict:
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "median_s": {key: round(value, 3) for key, value in medians.items()},
        "first_step_vs_import_torch": round(medians["first_step"] / medians["import_torch"], 2),
        "first_step_target": FIRST_STEP_TARGET,
        "help_target_s": HELP_TARGET_S,
    }


def table(times: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    header = ["what", "median (s)", "min-max (s)", "x import torch", "target"]
    # From the samples, not the summary's rounded medians: rounded twice, a median printed
    # outside its own min-max (0.185 -> "0.18" beside 0.18502 -> "0.19").
    medians = {key: statistics.median(values) for key, values in times.items()}
    import_s = medians["import_torch"]
    import_cpu_s = medians["import_torch_cpu"] or 1.0
    what = {
        "import_torch": ('python -c "import torch"', "-"),
        "help": ("distbelief --help", f"< {HELP_TARGET_S:g} s"),
        "train_help": ("distbelief train --help", f"< {HELP_TARGET_S:g} s"),
        "first_step": ("distbelief train: launch to first step", f"<= {FIRST_STEP_TARGET:g}x"),
        "job": (f"distbelief {' '.join(TRAIN_ARGS)}: launch to exit", "-"),
        "shard_serving": ("distbelief ps: launch to serving (address printed)", "-"),
        "shard_first_init": ("distbelief ps: launch to its answer to the first INIT", "-"),
        "import_torch_cpu": ('CPU seconds (machine): python -c "import torch"', "-"),
        "job_cpu": (f"CPU seconds (machine): distbelief {' '.join(TRAIN_ARGS)}", "-"),
        "shard_first_init_cpu": ("CPU seconds (machine): distbelief ps to its first INIT", "-"),
    }
    cells = []
    for key, (label, target) in what.items():
        median_s = medians[key]
        baseline_s = import_cpu_s if key.endswith("_cpu") else import_s
        cells.append(
            [
                label,
                f"{median_s:.2f}",
                f"{min(times[key]):.2f}-{max(times[key]):.2f}",
                f"{median_s / baseline_s:.2f}",
                target,
            ]
        )
    return header, cells


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=machine.at_least(1), default=3)
    parser.add_argument(
        "--out", type=machine.out_path, default=None, help="file stem; - writes nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    if args.out is None:
        date = datetime.date.today().strftime("%Y%m%d")
        args.out = RESULTS_DIR / f"startup_cpu{os.cpu_count()}_{date}"
    with tempfile.TemporaryDirectory() as runs_dir:
        times = measure(args.repeats, Path(runs_dir))
    summary = summarize(times)
    record = {"benchmark": "startup", **machine.environment()}
    record |= {"settings": {"repeats": args.repeats, "train_args": list(TRAIN_ARGS)}}
    record |= {"summary": summary, "times_s": times}
    description = (
        f"Medians of {args.repeats} interleaved repeats. First step: launch of "
        f"`distbelief {' '.join(TRAIN_ARGS)}` to the first worker's first step, from metrics.csv. "
        f"Shard: `distbelief {' '.join(SHARD_ARGS)} --no-auth` to its answer to a client's "
        f"handshake (INIT of a {SHARD_MODEL_NUMEL}-element model)."
    )
    title = "Start-up of the distbelief command"
    print(machine.write_report(args.out, record, title, description, *table(times)))
    return 0


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
