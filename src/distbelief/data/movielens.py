"""MovieLens ratings as a click log: (user, movie) ids in, "liked it" labels out.

Owns the three ratings-file formats, the rating -> label rule, the temporal split and the file
lookup in `<data_dir>/movielens/`. Reads ratings only; movie and user metadata are not used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch

from distbelief.config import (
    MAX_TENSOR_BYTES,
    TABLE_VALUE_BYTES,
    max_table_rows,
    physical_memory_bytes,
)
from distbelief.data.ctr import CtrDataset
from distbelief.data.files import MOVIELENS_RATINGS_FILES as RATINGS_FILES
from distbelief.data.files import MOVIELENS_SUBDIR as SUBDIR
from distbelief.data.files import field_as_written, lines_before_trailing_blanks, not_a_file
from distbelief.errors import DatasetUnavailableError

CSV_HEADER = b"userId,movieId,rating,timestamp"
MIN_STARS, MAX_STARS = 0.5, 5.0
"""The ratings MovieLens gives (whole stars 1-5, or half stars 0.5-5)."""
TEST_FRACTION = 0.1
"""Share of ratings, the latest by timestamp, that form the test split."""
MAX_ID = 2**63 - 2
"""Largest user or movie id a file may hold: a table holds max id + 1 rows, an int64. A dlrm
table of that many rows is bounded further by its width (``max_table_rows``): the launcher's
check refuses an id past that."""
_PLAIN_DIGITS = 18
"""Digits of an id or timestamp that ``_plain_record`` takes: any such number is in range."""


class Ratings(NamedTuple):
    """The columns of a ratings file, in file order."""

    users: np.ndarray
    """int64 user ids."""
    movies: np.ndarray
    """int64 movie ids."""
    ratings: np.ndarray
    """float64 ratings (whole or half stars)."""
    timestamps: np.ndarray
    """int64 seconds since the Unix epoch."""


def load_movielens(split: str, data_dir: str | Path, *, positive_at: float = 4.0) -> CtrDataset:
    """Loads one split of MovieLens from the one ratings file in `<data_dir>/movielens/`.

    Split: ratings are ordered by timestamp (ties keep file order); the last floor(10%) are
    test and the rest train, so the model predicts later ratings from earlier ones. Ids are
    the file's own (not renumbered): table_sizes is (max user id + 1, max movie id + 1) over
    the whole file, the same for both splits.

    Args:
        split: "train" or "test".
        data_dir: Folder that holds movielens/ with exactly one of ratings.dat, ratings.csv,
            u.data.
        positive_at: A rating >= positive_at is a positive (label 1.0), below it 0.0.

    Returns:
        The split as a CtrDataset named "movielens": sparse (N, 2) = [user id, movie id],
        dense (N, 0), rows in time order.

    Raises:
        ValueError: If split is unknown, several ratings files are present (or a folder by
            a ratings file's name, and no file), a line is malformed (the message names the
            file and the 1-based line number), or the split is empty (fewer than 10 ratings
            leave no test split).
        DatasetUnavailableError: If no ratings file is present.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = _find(Path(data_dir) / SUBDIR)
    ratings = read_ratings(path)
    _require_split(path, split, len(ratings.users))
    order = np.argsort(ratings.timestamps, kind="stable")
    num_test = _split_size(len(order), "test")
    rows = order[len(order) - num_test :] if split == "test" else order[: len(order) - num_test]
    table_sizes = tuple(int(ids.max()) + 1 for ids in (ratings.users, ratings.movies))
    sparse = np.stack([ratings.users[rows], ratings.movies[rows]], axis=1)
    return CtrDataset(
        dense=torch.zeros(len(rows), 0),
        sparse=torch.from_numpy(sparse),
        labels=torch.from_numpy((ratings.ratings[rows] >= positive_at).astype(np.float32)),
        name="movielens",
        table_sizes=table_sizes,
    )


def check_movielens_split(
    split: str, data_dir: str | Path, *, embedding_dim: int | None = None
) -> None:
    """``check_movielens_splits`` of one split."""
    check_movielens_splits((split,), data_dir, embedding_dim=embedding_dim)


def check_movielens_splits(
    splits: Sequence[str],
    data_dir: str | Path,
    *,
    embedding_dim: int | None = None,
    dense_tables: Sequence[str] = (),
) -> int:
    """Refuses a split that would be empty or a malformed line in the ratings file (which every
    split reads), checking each line once without keeping it: a line of plain digits by a
    pattern, any other as loading parses it, so both refuse the same lines (a quarter or so of
    what loading costs: a job checks this before starting the processes that load the file).

    With ``embedding_dim``, also an id too large for a dlrm table of that width: the tables
    hold max id + 1 rows, and torch builds no tensor past ``MAX_TENSOR_BYTES``, even on the
    meta device. The pattern then takes only ids of fewer digits than the bound, so the check
    costs the same; a longer id is parsed and compared. ``dense_tables`` (``tables.0``, the
    users', ``tables.1``, the movies'): those a job leaves dense, built whole on every worker:
    an id whose table would take more than this machine's memory is refused too.

    Returns:
        The number of ratings (examples) of the training split.

    Raises:
        ValueError: A split would be empty, or a line is malformed or holds an id too large;
            the message names the file (and the 1-based line number and the field).
        DatasetUnavailableError: No ratings file is present.
    """
    path = _find(Path(data_dir) / SUBDIR)
    separator = _separator(path)
    max_rows = None if embedding_dim is None else max_table_rows(embedding_dim)
    dense_rows = _dense_table_rows(embedding_dim, dense_tables)
    if max_rows is not None and dense_rows is not None:
        max_rows = min(max_rows, dense_rows)
    # 10**digits <= max_rows: every id of that many digits is below it.
    id_digits = _PLAIN_DIGITS if max_rows is None else min(_PLAIN_DIGITS, len(str(max_rows)) - 1)
    plain = _plain_record(separator, id_digits) if id_digits > 0 else None
    num_ratings = 0
    with path.open("rb") as f:
        for line_number, line in _records(path, f):
            if plain is None or plain.fullmatch(line) is None:
                user, movie, _, _ = _parse_line(path, line_number, line, separator)
                if embedding_dim is not None:
                    location = f"{path}:{line_number}"
                    _require_table_rows(location, "user id", user, embedding_dim)
                    _require_table_rows(location, "movie id", movie, embedding_dim)
                    for table, name, value in (
                        ("tables.0", "user id", user),
                        ("tables.1", "movie id", movie),
                    ):
                        if table in dense_tables and dense_rows is not None:
                            _require_dense_rows(
                                location, name, value, table, embedding_dim, dense_rows
                            )
            num_ratings += 1
    for split in splits:
        _require_split(path, split, num_ratings)
    return _split_size(num_ratings, "train")


def _require_table_rows(location: str, name: str, value: int, embedding_dim: int) -> None:
    """Refuses an id whose table (``value`` + 1 rows of ``embedding_dim``) torch cannot size."""
    max_rows = max_table_rows(embedding_dim)
    if value < max_rows:
        return
    bound = f"ids must be <= {max_rows - 1}" if max_rows else "no table that wide can be built"
    raise ValueError(
        f"{location}: {name} {value} is too large for a dlrm table: its {value + 1} rows of "
        f"{embedding_dim} values (--embedding-dim) x {TABLE_VALUE_BYTES} bytes are more than "
        f"the {MAX_TENSOR_BYTES} bytes torch can size a tensor to; {bound}"
    )


def _dense_table_rows(embedding_dim: int | None, dense_tables: Sequence[str]) -> int | None:
    """The most rows a table left dense may have: what this machine's memory holds (None: no
    table is left dense, or the system does not say)."""
    memory = physical_memory_bytes()
    if not dense_tables or embedding_dim is None or memory is None:
        return None
    return max(1, memory // (len(dense_tables) * embedding_dim * TABLE_VALUE_BYTES))


def _require_dense_rows(
    location: str, name: str, value: int, table: str, embedding_dim: int, most: int
) -> None:
    """Refuses an id whose table, left dense (built whole on every worker), would take more
    than this machine's memory (``most`` rows): the worker failed allocating it once
    started."""
    if value < most:
        return
    gib = (value + 1) * embedding_dim * TABLE_VALUE_BYTES / 2**30
    raise ValueError(
        f"{location}: {name} {value} makes {table}, left out of --tables, a dense parameter of "
        f"{value + 1} rows x {embedding_dim} values x {TABLE_VALUE_BYTES} bytes ({gib:.0f} GiB "
        "on every worker, more than this machine's memory): name it in --tables"
    )


def _split_size(num_ratings: int, split: str) -> int:
    num_test = int(num_ratings * TEST_FRACTION)
    return num_test if split == "test" else num_ratings - num_test


def _require_split(path: Path, split: str, num_ratings: int) -> None:
    if _split_size(num_ratings, split) > 0:
        return
    if num_ratings == 0:
        raise ValueError(f"{path}: holds no ratings: the MovieLens {split} split is empty")
    raise ValueError(
        f"{path}: the MovieLens test split (the latest {TEST_FRACTION:.0%} of the ratings, "
        f"rounded down) is empty: the file holds {num_ratings} ratings, it needs at least "
        f"{math.ceil(1 / TEST_FRACTION)}"
    )


def read_ratings(path: str | Path) -> Ratings:
    """Reads a MovieLens ratings file; its name picks the format.

    A name ending in .csv is CSV with the header line; .dat is `::`-separated; anything else
    (u.data) is tab-separated.

    Args:
        path: The ratings file.

    Returns:
        Its columns, in file order.

    Raises:
        ValueError: If the CSV header differs, or a line does not have 4 fields, has an id
            that is not an integer in [0, MAX_ID], a timestamp that is not a 64-bit integer
            or a rating that is not a finite number; the message names the file, the 1-based
            line number and the field.
    """
    path = Path(path)
    separator = _separator(path)
    users: list[int] = []
    movies: list[int] = []
    ratings: list[float] = []
    timestamps: list[int] = []
    with path.open("rb") as f:
        for line_number, line in _records(path, f):
            # Appended only once every field has parsed, so the columns stay the same length.
            user, movie, rating, timestamp = _parse_line(path, line_number, line, separator)
            users.append(user)
            movies.append(movie)
            ratings.append(rating)
            timestamps.append(timestamp)
    return Ratings(
        users=np.array(users, dtype=np.int64),
        movies=np.array(movies, dtype=np.int64),
        ratings=np.array(ratings, dtype=np.float64),
        timestamps=np.array(timestamps, dtype=np.int64),
    )


def _separator(path: Path) -> bytes:
    return b"," if path.suffix == ".csv" else b"::" if path.suffix == ".dat" else b"\t"


def _records(path: Path, f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """The file's record lines with their 1-based numbers, a CSV file's header checked and
    skipped, blank lines at its end left out."""
    lines = enumerate(lines_before_trailing_blanks(f), start=1)
    if path.suffix == ".csv":
        header = next(lines, (1, b""))[1].strip()
        if header != CSV_HEADER:
            got = header[:60].decode("utf-8", errors="replace")
            raise ValueError(f"{path}:1: expected header {CSV_HEADER.decode()!r}, got {got!r}")
    return lines


def _plain_record(separator: bytes, id_digits: int = _PLAIN_DIGITS) -> re.Pattern[bytes]:
    """A line of plain digits that parses without fail: ids of at most ``id_digits`` (<= 18)
    digits and a timestamp of at most 18 are within their ranges, a rating of one digit and
    at most 6 decimals is within ``MIN_STARS``-``MAX_STARS`` (others are parsed and checked)."""
    sep = re.escape(separator)
    ids = rb"[0-9]{1,%d}" % id_digits
    stars = rb"(?:[1-4](?:\.[0-9]{1,6})?|5(?:\.0{1,6})?|0\.[5-9][0-9]{0,5})"
    return re.compile(rb"%s%s%s%s%s%s-?[0-9]{1,18}\r?\n?" % (ids, sep, ids, sep, stars, sep))


def _parse_line(
    path: Path, line_number: int, line: bytes, separator: bytes
) -> tuple[int, int, float, int]:
    """One `user sep movie sep rating sep timestamp` line; ValueError naming the file, the line
    and the field otherwise."""
    try:
        return _parse_record(line, separator)
    except ValueError as e:
        raise ValueError(f"{path}:{line_number}: {e}") from e


def _parse_record(line: bytes, separator: bytes) -> tuple[int, int, float, int]:
    # Only the line's terminator goes: a leading or trailing separator is a field (empty), as
    # it is to the pattern of the check.
    fields = line.rstrip(b"\r\n").split(separator)
    if len(fields) != 4:
        shown = separator.decode()
        raise ValueError(f"expected 4 fields separated by {shown!r}, got {len(fields)}")
    return (
        _integer(fields[0], "user id", 0, MAX_ID),
        _integer(fields[1], "movie id", 0, MAX_ID),
        _rating(fields[2]),
        _integer(fields[3], "timestamp", -(2**63), 2**63 - 1),
    )


def _integer(field: bytes, name: str, low: int, high: int) -> int:
    """``field`` as an int in [low, high]; ValueError naming the field otherwise."""
    try:
        # int() and float() also read digits grouped by underscores ("1_0" as 10): no
        # ratings file writes them, so such a field is malformed, not a number.
        value: int | None = None if b"_" in field else int(field)
    except ValueError:  # not an integer, or more digits than int() reads
        value = None
    if value is not None and low <= value <= high:
        return value
    text = field.strip()
    problem = f"be in [{low}, {high}]" if text.lstrip(b"-").isdigit() else "be an integer"
    raise ValueError(f"{name} must {problem}, got {field_as_written(text)}")


def _rating(field: bytes) -> float:
    try:
        if b"_" in field:
            raise ValueError(field)
        rating = float(field)
    except ValueError:
        raise ValueError(
            f"rating must be a number, got {field_as_written(field.strip())}"
        ) from None
    if not np.isfinite(rating):
        raise ValueError(f"rating must be a finite number, got {field_as_written(field.strip())}")
    if not MIN_STARS <= rating <= MAX_STARS:
        # Every MovieLens release rates 1-5 stars (the latest in half stars from 0.5): a
        # rating beyond is a damaged file, whose label would be a guess.
        raise ValueError(
            f"rating must be {MIN_STARS:g} to {MAX_STARS:g} stars, got "
            f"{field_as_written(field.strip())}"
        )
    return rating


def _find(movielens_dir: Path) -> Path:
    present = [movielens_dir / name for name in RATINGS_FILES if (movielens_dir / name).is_file()]
    blocked = None if present else not_a_file(movielens_dir / name for name in RATINGS_FILES)
    if blocked:
        raise ValueError(blocked)
    if not present:
        raise DatasetUnavailableError(
            f"no MovieLens ratings file in {movielens_dir}: expected one of "
            f"{', '.join(RATINGS_FILES)} (from ml-1m, ml-10m, ml-20m, ml-25m, ml-latest or ml-100k)"
        )
    if len(present) > 1:
        # Guessing which one is meant could silently train on the wrong data set.
        raise ValueError(
            f"several MovieLens ratings files in {movielens_dir}: "
            f"{', '.join(p.name for p in present)}; keep one"
        )
    return present[0]
