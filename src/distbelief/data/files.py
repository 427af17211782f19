"""Where each file-backed data set's files go, and which of a job's are missing.

Torch-free, so the launcher (and ``worker`` and ``eval``) can refuse a job whose files are
absent before starting any process; the loaders read the same names from here, and their
text files' lines through ``lines_before_trailing_blanks`` (a bad field quoted by
``field_as_written``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from distbelief.config import DataConfig
from distbelief.errors import ConfigFieldError

DEFAULT_DATA_DIR = Path("data")

FILE_DATASETS = ("cifar10", "mnist", "criteo", "movielens")
"""The data sets read from files in a data folder (the others are generated or bundled)."""
FIXED_TRAIN_EXAMPLES = {"digits": 1437, "synthetic": 4096, "synthetic-ctr": 100_000}
"""Training examples of the data sets not read from files (bundled or generated): the launcher
checks a batch against each worker's share of them without loading torch."""

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_BATCHES_DIR = "cifar-10-batches-py"
CIFAR10_ARCHIVE_NAME = "cifar-10-python.tar.gz"
CIFAR10_SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

MNIST_URL_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_SUBDIR = "mnist"
MNIST_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""(images file, labels file) per split, each raw or with a .gz suffix."""

CRITEO_SUBDIR = "criteo"
CRITEO_SUFFIXES = (".txt", ".tsv", ".txt.gz", ".tsv.gz")
"""A split's file is ``<split>`` with one of these; without test.*, train.* is split."""

MOVIELENS_SUBDIR = "movielens"
MOVIELENS_RATINGS_FILES = ("ratings.dat", "ratings.csv", "u.data")
"""ML-1M/10M (`UserID::MovieID::Rating::Timestamp`), ML-20M/25M/latest (CSV with the header
`userId,movieId,rating,timestamp`) and ML-100K (tab-separated `user item rating timestamp`)."""


def missing_data_files(
    config: DataConfig, splits: tuple[str, ...] = ("train", "test")
) -> str | None:
    """What a job's data set lacks in ``config.data_dir`` that it cannot fetch itself (CIFAR-10
    and MNIST download what is missing unless ``config.download`` is off); None if nothing.
    ``splits``: those the job reads (an evaluator reads the test split alone: CIFAR-10's and
    MNIST's need no train file; a click log's test split may be cut from its training file)."""
    root = Path(config.data_dir) if config.data_dir else DEFAULT_DATA_DIR
    if config.name in FILE_DATASETS and root.exists() and not root.is_dir():
        # Not a folder to download or extract into, nor to find the files in.
        return f"{root} is a file, not a folder" if root.is_file() else f"{root} is not a folder"
    if config.name == "cifar10" and not config.download:
        folder = root / CIFAR10_BATCHES_DIR
        names = [name for split in splits for name in CIFAR10_SPLIT_FILES[split]]
        missing = [name for name in names if not (folder / name).is_file()]
        # The archive itself, there already, is extracted by the loader.
        if missing and not (root / CIFAR10_ARCHIVE_NAME).is_file():
            return not_a_file(folder / name for name in missing) or (
                f"{folder} lacks {', '.join(missing)}: download {CIFAR10_URL} into {root} "
                "(it is extracted there), or let the job download it (without --no-download)"
            )
    elif config.name == "mnist" and not config.download:
        folder = root / MNIST_SUBDIR
        names = [name for split in splits for name in MNIST_SPLIT_FILES[split]]
        missing = [name for name in names if not _present(folder, name, ("", ".gz"))]
        if missing:
            candidates = (folder / f"{name}{suffix}" for name in missing for suffix in ("", ".gz"))
            return not_a_file(candidates) or (
                f"{folder} lacks {', '.join(missing)} (raw or .gz): download them from "
                f"{MNIST_URL_BASE}<name>.gz, or let the job download them (without --no-download)"
            )
    elif config.name == "criteo":
        folder = root / CRITEO_SUBDIR
        if not _present(folder, "train", CRITEO_SUFFIXES):
            names = ", ".join(f"train{suffix}" for suffix in CRITEO_SUFFIXES)
            blocked = not_a_file(folder / f"train{suffix}" for suffix in CRITEO_SUFFIXES)
            return blocked or f"{folder} holds no Criteo training file: expected one of {names}"
    elif config.name == "movielens":
        folder = root / MOVIELENS_SUBDIR
        if not any((folder / name).is_file() for name in MOVIELENS_RATINGS_FILES):
            names = ", ".join(MOVIELENS_RATINGS_FILES)
            blocked = not_a_file(folder / name for name in MOVIELENS_RATINGS_FILES)
            return blocked or f"{folder} holds no MovieLens ratings file: expected one of {names}"
    return None


def require_data_files(config: DataConfig, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Raise ConfigFieldError (``data.data_dir``: the flag --data-dir) naming what a job's
    data set lacks of ``splits`` (see ``missing_data_files``), or the file or folder it cannot
    look into (a folder without permissions, say)."""
    try:
        missing = missing_data_files(config, splits)
    except OSError as e:
        raise ConfigFieldError("data.data_dir", os_error_message(e)) from e
    if missing is not None:
        raise ConfigFieldError("data.data_dir", missing)


def os_error_message(error: OSError) -> str:
    """An error of the operating system on a data file (unreadable, a folder where the file
    should be, a failing disk) in one line naming the file, as a corrupt file is named."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename else f"a data file: {reason}"


def not_a_file(paths: Iterable[Path]) -> str | None:
    """What to say of the first of ``paths`` that is there but is no file (a folder where a
    data file should be); None if there is none: the files are missing. The loaders say it
    too, rather than that the file is missing (and, allowed to, fetching it beside the
    folder)."""
    for path in paths:
        if path.exists() and not path.is_file():
            return f"{path} is a folder, not a file" if path.is_dir() else f"{path} is not a file"
    return None


def lines_before_trailing_blanks(lines: Iterable[bytes]) -> Iterator[bytes]:
    """A text file's lines less the blank ones that end it, as editors and exporters leave
    them; a blank line that another line follows is kept, so the format check names it."""
    blanks: list[bytes] = []
    for line in lines:
        if not line.strip():
            blanks.append(line)
            continue
        yield from blanks
        blanks.clear()
        yield line


def _present(folder: Path, stem: str, suffixes: tuple[str, ...]) -> bool:
    return any((folder / f"{stem}{suffix}").is_file() for suffix in suffixes)


FIELD_SHOWN_BYTES = 30
"""The most of a bad field an error quotes."""


def field_as_written(field: bytes) -> str:
    """A text file's field quoted as the file has it, spaces too (its first
    FIELD_SHOWN_BYTES, ``...`` after the quote when there is more), not as Python writes bytes
    (``b'abc'``)."""
    shown = repr(field[:FIELD_SHOWN_BYTES].decode("utf-8", "backslashreplace"))
    return shown + "..." * (len(field) > FIELD_SHOWN_BYTES)
