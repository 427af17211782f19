"""Criteo click logs from TSV files (Kaggle display-advertising and Terabyte day files).

Owns the line format, its dense and categorical transforms, the split convention and the file
lookup. One line: `label \\t I1..I13 \\t C1..C26`, a 0/1 label, 13 integer fields (may be empty
or negative) and 26 categorical fields (8 hex digits, or empty). Files are plain or gzipped.
"""

from __future__ import annotations

import gzip
import itertools
import math
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch

from distbelief.data.ctr import CtrDataset
from distbelief.data.files import CRITEO_SUBDIR as SUBDIR
from distbelief.data.files import CRITEO_SUFFIXES as FILE_SUFFIXES
from distbelief.data.files import field_as_written, lines_before_trailing_blanks
from distbelief.errors import DatasetUnavailableError

NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CATEGORICAL
RAW_ID_SPACE = 2**32
"""Distinct values of an 8-hex-digit categorical field."""
MISSING_RAW_ID = RAW_ID_SPACE
"""Id of an empty categorical field when ids are raw: one past the largest hex value."""
TEST_FRACTION = 0.1
"""Share of rows, taken from the end of train's file, that form test when it has no file."""

MAX_DENSE_DIGITS = 19
"""Digits of an integer field at most: any such value converts to float64 (int64's fit)."""

_LINE = re.compile(
    rb"[01]"
    + rb"\t(?:-?[0-9]{1,%d})?" % MAX_DENSE_DIGITS * NUM_DENSE
    + rb"\t(?:[0-9a-fA-F]{8})?" * NUM_CATEGORICAL
    + rb"\r?\n?"
)
_HEX = re.compile(rb"[0-9a-fA-F]{8}")
_INTEGER = re.compile(rb"-?[0-9]{1,%d}" % MAX_DENSE_DIGITS)


def load_criteo(
    split: str,
    data_dir: str | Path,
    *,
    num_embeddings: int | Sequence[int] | None = None,
    max_rows: int | None = None,
) -> CtrDataset:
    """Loads one split from `<data_dir>/criteo/`.

    Each split reads `<split>` + one of .txt, .tsv, .txt.gz, .tsv.gz (the first found). Without
    a test file, train.* is split in file order: its last floor(10%) rows are test and the
    rest train, so test is later in time than train (the files are time-ordered). A test file
    must carry labels: the Kaggle challenge's unlabelled test.txt does not, so move it away.

    Args:
        split: "train" or "test".
        data_dir: Folder that holds criteo/.
        num_embeddings: Rows per table (one int for all 26 tables, or 26 ints); see
            ``read_criteo``. None keeps the raw 32-bit ids.
        max_rows: Read at most this many rows of the file, >= 0; when one file holds both
            splits, the 90/10 split divides these rows.

    Returns:
        The split as a CtrDataset named "criteo".

    Raises:
        ValueError: If split is unknown, an argument is out of range, a line is malformed
            (the message names the file and the line number), or the split is empty (the
            message names the file).
        DatasetUnavailableError: If the file the split needs is missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    rows = _split_rows(split, Path(data_dir) / SUBDIR, max_rows)
    dataset = read_criteo(
        rows.path, num_embeddings=num_embeddings, max_rows=rows.max_rows, first_row=rows.first_row
    )
    if len(dataset) == 0:
        raise ValueError(_empty_split_message(split, rows))
    return dataset


def check_criteo_split(split: str, data_dir: str | Path) -> int:
    """Refuses a split that would be empty or holds a malformed line, matching each of its
    lines against the format without converting it (a fifth or so of what loading costs: a job
    checks this before starting the processes that load the split).

    Returns:
        The split's number of rows (examples).

    Raises:
        ValueError: The split would be empty, or a line is malformed; the message names the
            file (and the 1-based line number).
        DatasetUnavailableError: The file the split needs is missing.
    """
    rows = _split_rows(split, Path(data_dir) / SUBDIR, None)
    with _open(rows.path) as lines:
        num_rows = sum(1 for _ in _checked_lines(rows.path, lines, rows.first_row, rows.max_rows))
    if num_rows == 0:
        raise ValueError(_empty_split_message(split, rows))
    return num_rows


class _SplitRows(NamedTuple):
    """Where a split's rows are: ``max_rows`` rows of ``path`` from ``first_row`` on."""

    path: Path
    first_row: int
    max_rows: int | None
    shared_rows: int | None
    """The rows of train.* that both splits divide (counted, at most max_rows); None: the
    split has the file to itself."""


def _split_rows(split: str, criteo_dir: Path, max_rows: int | None) -> _SplitRows:
    test_path = _find(criteo_dir, "test")
    if split == "test" and test_path is not None:
        return _SplitRows(test_path, 0, max_rows, None)
    train_path = _find(criteo_dir, "train")
    if train_path is None:
        names = ", ".join(f"{split}{suffix}" for suffix in FILE_SUFFIXES)
        raise DatasetUnavailableError(
            f"no Criteo file for split {split!r} in {criteo_dir}: expected one of {names}"
            + ("" if split == "train" else " (or train.* to split)")
        )
    if test_path is not None:
        return _SplitRows(train_path, 0, max_rows, None)
    num_rows = _count_lines(train_path)
    if max_rows is not None:
        num_rows = min(num_rows, max_rows)
    num_test = int(num_rows * TEST_FRACTION)
    first, stop = (0, num_rows - num_test) if split == "train" else (num_rows - num_test, num_rows)
    return _SplitRows(train_path, first, stop - first, num_rows)


def _empty_split_message(split: str, rows: _SplitRows) -> str:
    if not rows.shared_rows:
        return f"{rows.path}: holds no rows: the Criteo {split} split is empty"
    return (
        f"{rows.path}: the Criteo test split (without a test file, the last "
        f"{TEST_FRACTION:.0%} of train's {rows.shared_rows} rows, rounded down) is empty: it "
        f"needs at least {math.ceil(1 / TEST_FRACTION)} rows, or a test file"
    )


def read_criteo(
    path: str | Path,
    *,
    num_embeddings: int | Sequence[int] | None = None,
    max_rows: int | None = None,
    first_row: int = 0,
) -> CtrDataset:
    """Reads one Criteo TSV file (plain, or gzipped if the name ends in .gz).

    Dense features are log(1 + max(x, 0)), an empty field counting as 0. A categorical field
    becomes its hex value as an int64 id. Without num_embeddings, ids are raw: an empty field
    is MISSING_RAW_ID (2**32) and every table has 2**32 + 1 rows. With num_embeddings = n for
    a table, its ids fold into n rows: a value v becomes v mod (n - 1) and an empty field the
    last row, n - 1, which no value shares.

    Args:
        path: The file.
        num_embeddings: Rows per table, each >= 2: one int for all 26 tables, or 26 ints.
        max_rows: Read at most this many rows, >= 0; None reads to the end.
        first_row: Skip this many rows first (unparsed), >= 0.

    Returns:
        A CtrDataset named "criteo": dense (N, 13), sparse (N, 26), labels (N,).

    Raises:
        ValueError: If an argument is out of range, the file is not valid gzip, or a line is
            malformed; the message names the file and the 1-based line number.
    """
    sizes = criteo_table_sizes(num_embeddings)
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    if first_row < 0:
        raise ValueError(f"first_row must be >= 0, got {first_row}")
    labels: list[bool] = []
    dense: list[list[int]] = []
    sparse: list[list[int]] = []
    with _open(path) as lines:
        for line in _checked_lines(path, lines, first_row, max_rows):
            fields = line.rstrip(b"\r\n").split(b"\t")
            labels.append(fields[0] == b"1")
            dense.append([int(field) if field else 0 for field in fields[1 : 1 + NUM_DENSE]])
            sparse.append([int(field, 16) if field else -1 for field in fields[1 + NUM_DENSE :]])
    return _to_dataset(labels, dense, sparse, sizes)


def criteo_table_sizes(num_embeddings: int | Sequence[int] | None) -> tuple[int, ...]:
    """The 26 table sizes that read_criteo gives for a num_embeddings argument.

    Raises:
        ValueError: If num_embeddings is not one int or 26 ints, or a size is < 2.
    """
    if num_embeddings is None:
        return (RAW_ID_SPACE + 1,) * NUM_CATEGORICAL
    sizes = (
        (num_embeddings,) * NUM_CATEGORICAL
        if isinstance(num_embeddings, int)
        else tuple(num_embeddings)
    )
    if len(sizes) != NUM_CATEGORICAL or min(sizes) < 2:
        raise ValueError(
            f"num_embeddings must be one int >= 2 or {NUM_CATEGORICAL} of them (a row is "
            f"kept for missing values), got {num_embeddings}"
        )
    return sizes


def _to_dataset(
    labels: list[bool], dense: list[list[int]], sparse: list[list[int]], sizes: tuple[int, ...]
) -> CtrDataset:
    dense_array = np.array(dense, dtype=np.float64).reshape(-1, NUM_DENSE)
    raw_ids = np.array(sparse, dtype=np.int64).reshape(-1, NUM_CATEGORICAL)
    missing = raw_ids < 0
    if sizes[0] == RAW_ID_SPACE + 1:
        ids = np.where(missing, MISSING_RAW_ID, raw_ids)
    else:
        # One row per table is kept back for missing values, so fold into the other n - 1.
        num_rows = np.array(sizes, dtype=np.int64)
        ids = np.where(missing, num_rows - 1, raw_ids % (num_rows - 1))
    return CtrDataset(
        dense=torch.from_numpy(np.log1p(np.maximum(dense_array, 0.0)).astype(np.float32)),
        sparse=torch.from_numpy(ids),
        labels=torch.tensor(labels, dtype=torch.float32),
        name="criteo",
        table_sizes=sizes,
    )


def _checked_lines(
    path: str | Path, lines: Iterable[bytes], first_row: int, max_rows: int | None
) -> Iterator[bytes]:
    """``max_rows`` lines (None: all) from ``first_row`` on, each matched against the format;
    ValueError naming the file and the 1-based line number at the first that is malformed."""
    stop = None if max_rows is None else first_row + max_rows
    numbered = enumerate(lines_before_trailing_blanks(lines), start=1)
    for line_number, line in itertools.islice(numbered, first_row, stop):
        if _LINE.fullmatch(line) is None:
            raise ValueError(f"{path}:{line_number}: {_describe_malformed(line)}")
        yield line


def _describe_malformed(line: bytes) -> str:
    """Why a line failed the format check, naming the first bad field."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != NUM_FIELDS:
        hint = " (no label column: an unlabelled file?)" if len(fields) == NUM_FIELDS - 1 else ""
        return f"expected {NUM_FIELDS} tab-separated fields, got {len(fields)}{hint}"
    if fields[0] not in (b"0", b"1"):
        return f"label must be 0 or 1, got {field_as_written(fields[0])}"
    for i, field in enumerate(fields[1 : 1 + NUM_DENSE], start=1):
        if field and _INTEGER.fullmatch(field) is None:
            return (
                f"I{i} must be an integer of at most {MAX_DENSE_DIGITS} digits or empty, got "
                f"{field_as_written(field)}"
            )
    for i, field in enumerate(fields[1 + NUM_DENSE :], start=1):
        if field and _HEX.fullmatch(field) is None:
            return f"C{i} must be 8 hex digits or empty, got {field_as_written(field)}"
    return "stray carriage return or line terminator"


def _find(criteo_dir: Path, stem: str) -> Path | None:
    for suffix in FILE_SUFFIXES:
        candidate = criteo_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
        if candidate.exists():
            # Passed over, a test.* folder would silently make test of train's last rows.
            raise ValueError(f"{candidate}: not a file (a Criteo {stem} split is one file)")
    return None


def _count_lines(path: Path) -> int:
    with _open(path) as lines:
        return sum(1 for _ in lines_before_trailing_blanks(lines))


@contextmanager
def _open(path: str | Path) -> Iterator[BinaryIO]:
    """The file's lines as bytes, gunzipped if the name ends in .gz."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            yield f
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a valid gzip file: {e}") from e
