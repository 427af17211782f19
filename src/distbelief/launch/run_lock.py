"""One job at a time in a run folder.

A launcher holds an exclusive lock on its run folder for the job's whole life, and ``reshard``
for its rewrite; a second launcher (``train --resume`` of a run still going, ``--out`` of one)
or a reshard meanwhile is refused instead of writing over the live job's checkpoints and
records. The lock is ``flock`` on the folder itself: no file is added, and the kernel drops it
when its holder ends, however it ends (SIGKILL too), so a crashed run never blocks the next.

A ``distbelief ps`` holds its shard's checkpoints in ``--checkpoint-dir`` the same way, through a
``shard{i}.lock`` file there (the shards of one job may share the folder; the file goes when
the shard does): a second process serving that shard from it would write its checkpoints over
the first's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

LOCKS_TABLE = Path("/proc/locks")

_lent_within: set[tuple[int, int]] = set()
"""The run folders (device, inode) this process holds for the calls made within the hold:
``train --resume`` takes its folder before it reads the run's config.json, and the reshard and
the job it then starts take it again."""


def _holder(locked: Path) -> str:
    """`` (pid N)`` of the process holding ``locked``'s lock (a folder or a file), from the
    kernel's lock table (empty where it cannot be read: another system, say)."""
    try:
        info = locked.stat()
        wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
        for line in LOCKS_TABLE.read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 4242 00:2b:1234 0 EOF"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                return f" (pid {fields[4]})"
    except (OSError, ValueError):
        pass
    return ""


@contextlib.contextmanager
def run_dir_locked(run_dir: Path, what: str, *, lend_within: bool = False) -> Iterator[None]:
    """Hold ``run_dir`` (an existing folder) for the block.

    Args:
        run_dir: The run folder.
        what: How the user named it, for the refusal (``--resume RUN``, say).
        lend_within: The calls made within the block that hold the folder too (a resume's
            reshard and job) do so under this hold. Any other hold, in this process too, is
            another holder's.

    Raises:
        ValueError: another process holds it (a job running in it, or a reshard), or this one
            does without lending it.
    """
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    info = os.fstat(fd)
    folder = (info.st_dev, info.st_ino)
    if folder in _lent_within:
        os.close(fd)
        yield
        return
    with _flocked(
        fd,
        run_dir,
        lambda holder: (
            f"{what}: another job is using this run folder{holder}: "
            "wait for it to end, or stop it first"
        ),
    ):
        if not lend_within:
            yield
            return
        _lent_within.add(folder)
        try:
            yield
        finally:
            _lent_within.discard(folder)


@contextlib.contextmanager
def shard_checkpoints_locked(directory: str | Path, shard_id: int) -> Iterator[None]:
    """Hold shard ``shard_id``'s checkpoints in ``directory`` (an existing folder) for the
    block, through its ``shard{i}.lock`` file, which is removed as the hold ends: a shard that
    was refused, or has ended, leaves no file of its own behind.

    Raises:
        ValueError: another process holds them (a shard of that id serving from the folder),
            or the lock file cannot be opened, naming ``--checkpoint-dir`` as given.
    """
    path = Path(directory) / f"shard{shard_id}.lock"
    for _ in range(_LOCK_FILE_TRIES):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:  # a folder of that name, a read-only folder
            raise ValueError(
                f"--checkpoint-dir {directory}: cannot open {path.name} there to hold shard "
                f"{shard_id}'s checkpoints ({e.strerror})"
            ) from None
        with _flocked(
            fd,
            path,
            lambda holder: (
                f"--checkpoint-dir {directory}: shard {shard_id} is already served from this "
                f"folder{holder}: stop it first, or give this one another folder"
            ),
        ):
            if not _is_file_at(fd, path):
                # Its holder removed it as it let go, after this open: the file there now is
                # the one to hold (holding the removed one would hold nothing another shard
                # can see).
                continue
            try:
                yield
            finally:
                # Removed while still held: a process that opened it meanwhile finds, once it
                # holds it, that it is no longer the file there, and takes the new one.
                with contextlib.suppress(OSError):
                    path.unlink()
            return
    raise ValueError(
        f"--checkpoint-dir {directory}: {path.name} was replaced {_LOCK_FILE_TRIES} times "
        "while this shard took it: is another program removing it?"
    )


_LOCK_FILE_TRIES = 100
"""How many times a shard lock file is taken again after it was replaced as it was taken:
each time means that another holder let go in that very instant."""


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the open file that ``path`` names now."""
    try:
        there = path.stat()
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def _flocked(fd: int, locked: Path, refusal: Callable[[str], str]) -> Iterator[None]:
    """Hold ``fd``'s exclusive lock for the block and close it after (which releases it);
    ValueError ``refusal(holder)`` (`` (pid N)``, where known) if another process holds
    ``locked``."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(refusal(_holder(locked))) from None
        yield
    finally:
        os.close(fd)  # releases the lock
