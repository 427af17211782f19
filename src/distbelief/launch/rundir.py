"""The run folder: where it goes and how files land in it (atomically: temp file, then rename)."""

from __future__ import annotations

import contextlib
import csv
import stat
import time
from pathlib import Path

from distbelief.errors import CheckpointError
from distbelief.files import make_folder, write_text_atomic
from distbelief.launch.cluster import CHECKPOINT_DIR
from distbelief.launch.hints import shell_word

__all__ = [
    "RESHARD_ASIDE_PREFIX",
    "interrupted_reshard",
    "misplaced_run_entry",
    "missing_run_folder",
    "nothing_to_resume",
    "prepare_run_dir",
    "records_of_training",
    "release_reserved",
    "reserve_run_dir",
    "reserved_for_this_launch",
    "run_dir_path",
    "write_text_atomic",
]


def run_dir_path(out_dir: str) -> Path:
    """Where the run folder goes: ``out_dir``, or ``runs/<timestamp>`` when it is empty."""
    return Path(out_dir) if out_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


_MAX_RUNS_A_SECOND = 1000
_reserved: dict[Path, bool] = {}
"""The run folders ``reserve_run_dir`` made in this process (this launch's own, though they
exist already: a job refused leaves none), and whether it made their ``runs`` folder too."""


def reserve_run_dir() -> Path:
    """A new run folder, made now: ``runs/<timestamp>``, or ``runs/<timestamp>-2``, ``-3``...
    where a launch in the same second made that one (each name is made by one process only:
    two launches at once never share a folder).

    Raises:
        ValueError: it cannot be made (naming ``--out``, whose default it is).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = Path("runs")
    made_runs = not runs.exists()
    make_folder(runs, "--out")
    for count in range(1, _MAX_RUNS_A_SECOND + 1):
        folder = runs / (stamp if count == 1 else f"{stamp}-{count}")
        try:
            # parents: a launch refused meanwhile may have removed the runs folder it made.
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as e:
            raise ValueError(f"--out {folder}: cannot create the folder: {e.strerror}") from None
        _reserved[folder] = made_runs
        return folder
    raise ValueError(f"--out {runs / stamp}: {_MAX_RUNS_A_SECOND} runs of this second exist")


def reserved_for_this_launch(run_dir: Path) -> bool:
    """Whether ``reserve_run_dir`` made ``run_dir`` in this process."""
    return run_dir in _reserved


def release_reserved(run_dir: Path) -> None:
    """``run_dir`` is no longer this launch's to make: removed if ``reserve_run_dir`` made it
    and it is still empty (a job refused before it wrote anything), with the ``runs`` folder
    it made for it, if that is empty too."""
    if run_dir not in _reserved:
        return
    made_runs = _reserved.pop(run_dir)
    with contextlib.suppress(OSError):  # only an empty folder goes (or gone already)
        run_dir.rmdir()
    if made_runs:
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()


def prepare_run_dir(out_dir: str) -> Path:
    """Create the run folder (``runs/<timestamp>`` when ``out_dir`` is empty)."""
    return make_folder(run_dir_path(out_dir), "--out")


def missing_run_folder(path: Path | str) -> str | None:
    """Why ``path`` cannot be a run folder to go on from (it is not there, or is a file), in
    words that follow it in an error; None when it is a folder."""
    folder = Path(path)
    try:
        if folder.is_dir():
            return None
        return "a file, not a run folder" if folder.exists() else "no such run folder"
    except OSError as e:  # a name too long for the file system, say
        return f"not a run folder ({e.strerror or e})"


RUN_FOLDERS = (CHECKPOINT_DIR, "tensorboard")
"""The folders a run keeps in its run folder."""
RUN_FILES = ("config.json", "metrics.csv", "summary.json", "staleness.json", "pids.json")
"""Files a run writes in its run folder (whole, by a rename, or appended to)."""
TRACEBACK_SUFFIX = "-traceback.txt"
"""A failed process's traceback in its run folder: ``<process>-traceback.txt``."""


def misplaced_run_entry(
    run_dir: Path, files: tuple[str, ...] = RUN_FILES, folders: tuple[str, ...] = RUN_FOLDERS
) -> str | None:
    """Why a run could not write its records in ``run_dir``: one of ``folders`` or ``files``
    is there as something else (a folder where its metrics.csv goes, a file where
    its checkpoints do, a broken link); None when none is. A job found it only once it had
    trained, or a shard failed on it, after the old run's records were written over."""
    wanted = [(name, True) for name in folders] + [(name, False) for name in files]
    for name, folder in wanted:
        path = run_dir / name
        try:
            if not (path.exists() or path.is_symlink()) or (
                path.is_dir() if folder else path.is_file()
            ):
                continue
            kind = _kind_of(path)
        except OSError as e:
            return f"{path} cannot be read ({e.strerror or e})"
        keeps = "folder" if folder else "file"
        return f"{path} is {kind}, where the run keeps its {keeps} of that name"
    return None


def _kind_of(path: Path) -> str:
    if not path.exists():
        return "a broken link"
    if path.is_dir():
        return "a folder"
    mode = path.stat().st_mode
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a file" if stat.S_ISREG(mode) else "not a regular file"


RESHARD_ASIDE_PREFIX = f"{CHECKPOINT_DIR}.old-"
"""How ``reshard`` names a run's checkpoints folder while it puts the new set in its place."""


def interrupted_reshard(run_dir: Path) -> CheckpointError | None:
    """The error for a run folder whose reshard was killed between setting its checkpoints
    aside and putting the new set in their place (``checkpoints/`` missing, a
    ``checkpoints.old-*`` folder there); None for any other folder."""
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.exists():
        return None
    aside = sorted(run_dir.glob(f"{RESHARD_ASIDE_PREFIX}*"))
    if not aside:
        return None
    return CheckpointError(
        f"{checkpoints} is missing and {aside[0]} is there: a reshard was interrupted; "
        f"rename {aside[0].name} back to {CHECKPOINT_DIR}"
    )


def nothing_to_resume(run_dir: Path, checkpoints: Path) -> ValueError:
    """The refusal of ``--resume`` for a run folder whose shards saved no checkpoint (a run
    stopped in its first seconds): a new run in that folder is what goes on from there. One
    whose checkpoints an interrupted reshard left aside is told where they are instead: a
    new run there would write over its records."""
    interrupted = interrupted_reshard(run_dir)
    if interrupted is not None:
        return interrupted
    if records_of_training(run_dir):
        return ValueError(
            f"--resume {run_dir}: no shard checkpoints in {checkpoints}, though its metrics.csv "
            "holds records of its training: its checkpoints are gone, and nothing can go on "
            "from them; start a new run in another folder (one in this folder would write "
            "over these records)"
        )
    return ValueError(
        f"--resume {run_dir}: no shard checkpoints in {checkpoints} (it stopped before its "
        f"shards saved any: start it again with --out {shell_word(run_dir)})"
    )


TRAINING_ROLES = ("worker", "coordinator")
"""The roles whose records say a run trained (a stage's rows are a worker's): the shards had
saved their first checkpoint before any (not before the launcher's first poll of the shards,
nor an evaluation of version 0)."""


def records_of_training(run_dir: Path) -> bool:
    """Whether ``run_dir``'s metrics.csv holds a record of a role in ``TRAINING_ROLES``."""
    try:
        with (run_dir / "metrics.csv").open(newline="") as file:
            rows = csv.reader(file)
            header = next(rows, [])
            if "role" not in header:
                return False
            role = header.index("role")
            return any(len(row) > role and row[role] in TRAINING_ROLES for row in rows)
    except (OSError, UnicodeDecodeError, csv.Error):  # none readable: no records to keep
        return False
