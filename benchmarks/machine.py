"""What every benchmark records about the machine and the invocation next to its numbers."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


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
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown)
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
