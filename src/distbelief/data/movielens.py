"""MovieLens ratings as a click log: (user, movie) ids in, "liked it" labels out.

Owns the three ratings-file formats, the rating -> label rule, the temporal split and the file
lookup in `<data_dir>/movielens/`. Reads ratings only; movie and user metadata are not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from distbelief.data.ctr import CtrDataset
from distbelief.data.files import MOVIELENS_RATINGS_FILES as RATINGS_FILES
from distbelief.data.files import MOVIELENS_SUBDIR as SUBDIR
from distbelief.errors import DatasetUnavailableError

CSV_HEADER = b"userId,movieId,rating,timestamp"
TEST_FRACTION = 0.1
"""Share of ratings, the latest by timestamp, that form the test split."""


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
        ValueError: If split is unknown, several ratings files are present, or a line is
            malformed (the message names the file and the 1-based line number).
        DatasetUnavailableError: If no ratings file is present.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ratings = read_ratings(_find(Path(data_dir) / SUBDIR))
    order = np.argsort(ratings.timestamps, kind="stable")
    num_test = int(len(order) * TEST_FRACTION)
    rows = order[len(order) - num_test :] if split == "test" else order[: len(order) - num_test]
    table_sizes = tuple(int(ids.max(initial=-1)) + 1 for ids in (ratings.users, ratings.movies))
    sparse = np.stack([ratings.users[rows], ratings.movies[rows]], axis=1)
    return CtrDataset(
        dense=torch.zeros(len(rows), 0),
        sparse=torch.from_numpy(sparse),
        labels=torch.from_numpy((ratings.ratings[rows] >= positive_at).astype(np.float32)),
        name="movielens",
        # A file of no ratings still needs tables of at least one row.
        table_sizes=tuple(max(size, 1) for size in table_sizes),
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
        ValueError: If the CSV header differs, or a line does not have 4 fields, has a
            non-integer id or timestamp, a negative id or a non-numeric rating; the message
            names the file and the 1-based line number.
    """
    path = Path(path)
    separator = b"," if path.suffix == ".csv" else b"::" if path.suffix == ".dat" else b"\t"
    columns: tuple[list[int], list[int], list[float], list[int]] = ([], [], [], [])
    with path.open("rb") as f:
        lines = enumerate(f, start=1)
        if separator == b",":
            header = next(lines, (1, b""))[1].strip()
            if header != CSV_HEADER:
                raise ValueError(f"{path}:1: expected header {CSV_HEADER!r}, got {header[:60]!r}")
        for line_number, line in lines:
            try:
                _append_record(line, separator, columns)
            except ValueError as e:
                raise ValueError(f"{path}:{line_number}: {e}") from e
    users, movies, ratings, timestamps = columns
    return Ratings(
        users=np.array(users, dtype=np.int64),
        movies=np.array(movies, dtype=np.int64),
        ratings=np.array(ratings, dtype=np.float64),
        timestamps=np.array(timestamps, dtype=np.int64),
    )


def _append_record(
    line: bytes, separator: bytes, columns: tuple[list[int], list[int], list[float], list[int]]
) -> None:
    """Parses one `user sep movie sep rating sep timestamp` line onto the columns."""
    fields = line.strip().split(separator)
    if len(fields) != 4:
        raise ValueError(f"expected 4 fields separated by {separator!r}, got {len(fields)}")
    user, movie, rating, timestamp = (
        int(fields[0]),
        int(fields[1]),
        float(fields[2]),
        int(fields[3]),
    )
    if user < 0 or movie < 0:
        raise ValueError(f"ids must be >= 0, got user {user} movie {movie}")
    if not np.isfinite(rating):
        raise ValueError(f"rating must be a finite number, got {fields[2]!r}")
    # Appended only once every field has parsed, so the columns stay the same length.
    users, movies, ratings, timestamps = columns
    users.append(user)
    movies.append(movie)
    ratings.append(rating)
    timestamps.append(timestamp)


def _find(movielens_dir: Path) -> Path:
    present = [movielens_dir / name for name in RATINGS_FILES if (movielens_dir / name).is_file()]
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
