"""What every benchmark records about the machine and the invocation next to its numbers."""

from __future__ import annotations

import datetime
import os
import platform
import sys

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
