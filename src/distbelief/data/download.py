"""Fetching data set files: checksummed atomic download and safe tar extraction.

Owns the only network access of the data package (urllib). A file either appears complete and
verified at its destination or not at all; knows nothing about any data set's format.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from distbelief.errors import DatasetUnavailableError
from distbelief.files import give_mode_of_written, make_folder

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


def file_md5(path: Path) -> str:
    """The hex md5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str, timeout_s: float = 60.0) -> Path:
    """Downloads `url` to `dest`, verifying its md5; a verified file already there is kept.

    The bytes stream to a temporary file in dest's folder, which is renamed onto dest only after
    the checksum matches, so an interrupted or corrupt download never leaves a file at dest.

    Args:
        url: Source URL (http, https or file).
        dest: Destination path; its folder is created if missing.
        md5: Expected hex md5 digest of the file.
        timeout_s: Timeout of each blocking socket operation, in seconds.

    Returns:
        dest.

    Raises:
        DatasetUnavailableError: On a network error or timeout (naming the URL), when the
            downloaded bytes do not match `md5` (naming the URL and both digests), or when
            dest's folder cannot be written (a file in its way, say).
    """
    dest = Path(dest)
    if dest.is_file() and file_md5(dest) == md5:
        logger.info("%s already present with the expected md5", dest)
        return dest
    made = _missing_folders(dest.parent)
    try:
        make_folder(dest.parent, "data folder")
    except ValueError as e:
        raise DatasetUnavailableError(str(e)) from None
    logger.info("downloading %s -> %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp_path = Path(tmp_name)
    try:
        give_mode_of_written(fd, dest)
        actual_md5 = _stream_to_file(url, fd, timeout_s)
        if actual_md5 != md5:
            raise DatasetUnavailableError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {actual_md5}"
            )
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        for folder in made:  # a failed download leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return dest


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _stream_to_file(url: str, fd: int, timeout_s: float) -> str:
    """Copies the body of `url` into the open file `fd`; returns its hex md5."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as src:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, http.client.HTTPException) as e:
        # URLError, HTTPError and socket timeouts are all OSError subclasses.
        raise DatasetUnavailableError(f"could not download {url}: {e}") from e
    return digest.hexdigest()


def extract_tar(archive: Path, dest_dir: Path, required: Collection[str] = ()) -> None:
    """Extracts a tar archive into dest_dir, refusing members that could escape it.

    The members are extracted into a folder of their own in dest_dir, then each file is
    renamed into place: an extraction that fails or is interrupted (a full disk, Ctrl-C) leaves
    no half-written file at a member's name, which a later run would take for a whole one.

    Args:
        archive: Path of a (possibly compressed) tar file.
        dest_dir: Folder to extract into; created if missing.
        required: Files (paths in the archive) it must hold: an archive without them is
            another one, none of whose files is put in dest_dir.

    Raises:
        ValueError: If a member has an absolute path or a ".." component, or is anything other
            than a regular file or a directory (links could point outside dest_dir).
        DatasetUnavailableError: If the archive cannot be read, or lacks a required file.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{Path(archive).name}.", suffix=".part", dir=dest_dir))
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            files = {member.name.removeprefix("./") for member in members if member.isfile()}
            lacking = [name for name in required if name not in files]
            if not lacking:
                # The "data" filter (Python >= 3.10.12) is a second line of defence where it
                # exists.
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=members, filter="data")
                else:
                    tar.extractall(staging, members=members)
        if not lacking:
            _move_into_place(staging, dest_dir)
    except (OSError, tarfile.TarError, EOFError) as e:
        # tarfile's "file could not be opened successfully" lists every method it tried, one
        # line each: the error stays one line.
        reason = " ".join(str(e).split())
        raise DatasetUnavailableError(f"could not extract {archive}: {reason}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if lacking:
        raise DatasetUnavailableError(f"{Path(archive).name} did not contain them")


def _move_into_place(staging: Path, dest_dir: Path) -> None:
    """Rename every file extracted into ``staging`` to its place in ``dest_dir`` (one rename
    each, on one file system: a file appears whole), making the folders it needs."""
    for folder, _, files in os.walk(staging):
        target = dest_dir / Path(folder).relative_to(staging)
        target.mkdir(exist_ok=True)
        for name in files:
            os.replace(Path(folder) / name, target / name)


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")) or ".." in path.parts:
        raise ValueError(f"{archive}: refusing unsafe member path {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"{archive}: refusing member {member.name!r} that is not a file or dir")
