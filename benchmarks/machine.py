"""What every benchmark records about the machine and the invocation next to its numbers."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from distbelief.config import ModelConfig
from distbelief.errors import ConfigFieldError, LauncherInterrupted
from distbelief.files import write_text_atomic

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
"""A benchmark stopped by Ctrl-C or SIGINT exits so, as ``distbelief`` does."""


def environment(command: str | None = None) -> dict:
    """Date, command line, CPUs, load average, torch and Python versions.

    The load average is read when this is called (at the end of the runs): other jobs on a
    shared machine slow every timing, so only ratios within one run compare.
    """
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command or " ".join(["python", *sys.argv]),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


def write_report(
    stem: Path, record: dict, title: str, description: str, header: list[str], cells: list
) -> str:
    """``<stem>.json`` (the record) and ``<stem>.md`` (title, command, machine, description,
    table), unless stem is "-"; returns the markdown."""
    text = [
        f"# {title}",
        "",
        f"Command: `{record['command']}`",
        "",
        f"Date: {record['date']}; {record['cpu_count']} CPUs; torch {record['torch_version']}; "
        f"load average at the end {record['load_average_1_5_15_min']}",
        "",
        description,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in cells),
    ]
    markdown = "\n".join(text) + "\n"
    if str(stem) != "-":
        stem.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
        write_text_atomic(stem.with_suffix(".md"), markdown)
    return markdown


def close_process_pool(inboxes: list, processes: list, grace_s: float) -> None:
    """Stop a pool of benchmark worker processes: a ``None`` in each live one's inbox asks it
    to end, then whatever is left after ``grace_s`` is terminated, then killed."""
    for inbox, process in zip(inboxes, processes, strict=True):
        if process.is_alive():
            inbox.put(None)
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join(grace_s)


def at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``; anything else is a one-line usage
    error naming the flag (a count of 0 divided by zero, or took no sample to report)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def seed(text: str) -> int:
    """An argparse ``type``: a seed as ``distbelief train`` takes it (the job's config says
    which); a job's config would refuse any other, with a traceback once the benchmark has
    started."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    try:
        ModelConfig(seed=value)
    except ConfigFieldError as e:
        raise argparse.ArgumentTypeError(
            f"{e.problem.rpartition(', got ')[0]}, got {text!r}"
        ) from None
    return value


def above_zero(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a time, a rate); anything else is a one-line
    usage error naming the flag."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def out_path(text: str) -> Path:
    """An argparse ``type``: where a run writes its results (``--out``; ``-`` for nowhere). A
    path that is a folder, or whose folder cannot be made under its nearest existing ancestor
    (a file, or not writable), is a one-line usage error naming the flag before the run starts,
    not a traceback once the measurements are done."""
    path = Path(text)
    if text == "-":
        return path
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {ancestor} is not a folder")
    _check_writable(text, ancestor)
    return path


def out_folder(text: str) -> Path:
    """An argparse ``type``: the folder a run writes its results into (``--out``; ``-`` passes
    as it is, for the scripts that take it). An existing folder, or a new one in an existing
    folder; a file in its place, or a missing parent (a mistyped path made a tree of folders
    where nobody looks), is a one-line usage error naming the flag before the run starts."""
    path = Path(text)
    if text == "-":
        return path
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    parent = path.absolute().parent
    if not path.exists() and not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot make the folder {text!r}: {parent} {what}")
    _check_writable(text, path if path.is_dir() else parent)
    return path


@contextlib.contextmanager
def output_dirs(
    args: argparse.Namespace, prefix: str, results_dir: Path
) -> Iterator[tuple[Path, Path]]:
    """(results folder, run folders' parent) of a benchmark that runs jobs: ``args.out`` (an
    ``out_folder``), else ``results_dir``; --quick, or ``--out -`` (as every benchmark takes it:
    keep no results), writes results next to its runs. Without ``args.runs_dir`` the runs go
    to a temp folder, removed when the benchmark ends, however it ends."""
    with contextlib.ExitStack() as stack:
        runs_dir = args.runs_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{prefix}_"))
        )
        next_to_runs = str(args.out) == "-" or (args.quick and args.out is None)
        yield (runs_dir if next_to_runs else (args.out or results_dir)), runs_dir
        if args.runs_dir is None:
            logger.info("removing the run folders in %s (--runs-dir keeps them)", runs_dir)


def _check_writable(text: str, folder: Path) -> None:
    """A one-line usage error for ``text`` (the flag's value) when ``folder`` takes no file."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: {folder}: {e.strerror or e}"
        ) from e


def record_file(benchmark: str | None = None):
    """An argparse ``type``: the path of a JSON record this benchmark wrote (``--replot``,
    ``--report``). A missing or unreadable file, one that is not a JSON object, or the record of
    another benchmark is a one-line usage error naming the flag, not a traceback."""

    def parse(text: str) -> Path:
        path = Path(text)
        try:
            record = json.loads(path.read_text())
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {text!r}: {e.strerror or e}") from e
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {e}") from e
        if not isinstance(record, dict):
            raise argparse.ArgumentTypeError(f"{text!r} is not a benchmark record")
        wrote = record.get("benchmark")
        if benchmark is not None and wrote is not None and wrote != benchmark:
            raise argparse.ArgumentTypeError(
                f"{text!r} is a record of {wrote}.py, not {benchmark}.py"
            )
        return path

    return parse


def run_main(main: Callable[[], int]) -> int:
    """A benchmark script's entry point: ``main()``'s exit status. Ctrl-C, or SIGINT sent to its
    pid, stops it as it stops ``distbelief``: every process it started is stopped on the way
    out, then one line and exit 130, not a ``KeyboardInterrupt`` traceback. A script that a
    shell started in the background (SIGINT ignored) takes SIGINT too, instead of running on."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except (KeyboardInterrupt, LauncherInterrupted):
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
