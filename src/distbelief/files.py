"""Files that readers must never see half-written: written to a temporary name, then renamed;
and the digests that let a reader tell a complete file from a damaged one."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


def check_folder_can_be_made(path: Path | str, what: str) -> None:
    """Check, creating nothing, that folder ``path`` exists or can be created: its nearest
    existing ancestor is a writable folder. ValueError as ``make_folder``'s otherwise."""
    folder = Path(path)
    existing = folder
    try:
        while not existing.exists() and existing != existing.parent:
            if existing.is_symlink():  # mkdir says only "File exists" of it
                raise ValueError(
                    f"{what} {path}: {existing} is a link that leads nowhere (its target is "
                    "missing, or it is a loop)"
                )
            existing = existing.parent
    except OSError as e:  # a name too long for the file system, say
        raise ValueError(f"{what} {path}: {e.strerror or e}") from None
    if not existing.is_dir():
        where = "exists" if existing == folder else f"cannot be created: {existing} exists"
        raise ValueError(f"{what} {path}: {where} and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == folder:  # there already: nothing is to be created, nothing can be written
            raise ValueError(f"{what} {path}: the folder is not writable")
        raise ValueError(f"{what} {path}: cannot create the folder: {existing} is not writable")


def make_folder(path: Path | str, what: str) -> Path:
    """Create folder ``path`` (and its parents) if missing; returns it.

    Raises:
        ValueError: it exists and is not a folder, or cannot be created (naming ``what``, the
            flag or argument the user gave it with, and the path as given).
    """
    check_folder_can_be_made(path, what)
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create the folder: {e.strerror}") from None
    return folder


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    Raises:
        OSError: it could not be written (a read-only folder, a full disk), naming ``path``.
    """
    write_file_atomic(path, lambda tmp: tmp.write_text(text))


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a temporary file next to ``path``, then rename it to ``path``. The
    file gets the permissions ``path`` had, or a new file's (the umask's, as ``open`` gives).

    Raises:
        OSError: it could not be written (a read-only folder, a full disk, a folder by its
            name), naming ``path``: the temporary file is none of the caller's business.
    """
    write_files_atomic({path: write})


def write_files_atomic(writes: Mapping[Path, Callable[[Path], None]]) -> None:
    """``write_file_atomic`` of several files, all or none: each is filled into a temporary
    file first, and they are renamed only once every one is written, so a file that cannot be
    written (a folder by its name, a full disk) leaves none of the others new either.

    Raises:
        OSError: a file could not be written, naming it.
    """
    for path in writes:  # found before anything is written, not at its rename
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    written: dict[Path, str] = {}
    try:
        for path, write in writes.items():
            written[path] = _written_beside(path, write)
        for path, tmp in written.items():
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        for tmp in written.values():  # those not renamed
            Path(tmp).unlink(missing_ok=True)


def _written_beside(path: Path, write: Callable[[Path], None]) -> str:
    """A temporary file next to ``path``, filled by ``write``, with ``path``'s permissions
    (or a new file's) and on disk; OSError names ``path``, and no temporary file is left."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    try:
        mode = give_mode_of_written(fd, path)
    finally:
        os.close(fd)
    try:
        write(Path(tmp))
        # Again: a writer that replaces the file it is given (safetensors renames a private
        # temporary of its own onto it) leaves that file's mode, 0600.
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename in (None, tmp):  # a failed write or fsync: say of which file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def sync_folder(path: Path) -> None:
    """Make the renames in folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def give_mode_of_written(fd: int, path: Path) -> int:
    """Give the temporary file open at ``fd``, which is to replace ``path``, the permissions
    ``path`` has, or those ``open`` gives a new file (the umask's); returns them. ``mkstemp``
    makes it private (0600): a run's records, checkpoints and data are meant to be read by
    whoever may read their folder, as a file written in place would be."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    os.fchmod(fd, mode)
    return mode


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets one to read it, for
    every thread at once): Linux says it in /proc; elsewhere the usual 022 is assumed."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
