"""The run folder: where it goes and how files land in it (atomically: temp file, then rename)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def run_dir_path(out_dir: str) -> Path:
    """Where the run folder goes: ``out_dir``, or ``runs/<timestamp>`` when it is empty."""
    return Path(out_dir) if out_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare_run_dir(out_dir: str) -> Path:
    """Create the run folder (``runs/<timestamp>`` when ``out_dir`` is empty)."""
    path = run_dir_path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
