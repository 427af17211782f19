"""Unit tests for distbelief.data.movielens, on tiny files in the three ratings formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distbelief.data.movielens import check_movielens_split, load_movielens, read_ratings
from distbelief.errors import DatasetUnavailableError

# (user, movie, rating, timestamp), deliberately not in time order.
RATINGS = [
    (1, 10, 5.0, 1000),
    (2, 10, 3.0, 1003),
    (1, 31, 4.0, 1001),
    (3, 7, 1.0, 1009),
    (2, 31, 4.0, 1002),
    (4, 10, 2.0, 1004),
    (4, 7, 5.0, 1005),
    (1, 7, 3.0, 1006),
    (3, 10, 4.0, 1007),
    (2, 7, 2.0, 1008),
    (5, 12, 5.0, 1010),
]


def _format(name: str, rows: list[tuple]) -> str:
    if name == "ratings.dat":
        return "".join(f"{u}::{m}::{r:g}::{t}\n" for u, m, r, t in rows)
    if name == "ratings.csv":
        body = "".join(f"{u},{m},{r:.1f},{t}\n" for u, m, r, t in rows)
        return "userId,movieId,rating,timestamp\n" + body
    return "".join(f"{u}\t{m}\t{r:g}\t{t}\n" for u, m, r, t in rows)


def _write(data_dir: Path, name: str, text: str) -> Path:
    path = data_dir / "movielens" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["ratings.dat", "ratings.csv", "u.data"])
def test_each_format_reads_the_same_columns(tmp_path: Path, name: str) -> None:
    ratings = read_ratings(_write(tmp_path, name, _format(name, RATINGS)))
    assert ratings.users.tolist() == [r[0] for r in RATINGS]
    assert ratings.movies.tolist() == [r[1] for r in RATINGS]
    assert ratings.ratings.tolist() == [r[2] for r in RATINGS]
    assert ratings.timestamps.tolist() == [r[3] for r in RATINGS]


@pytest.mark.parametrize("name", ["ratings.dat", "ratings.csv", "u.data"])
def test_the_latest_tenth_is_test_and_labels_mark_ratings_of_four_or_more(
    tmp_path: Path, name: str
) -> None:
    _write(tmp_path, name, _format(name, RATINGS))
    train = load_movielens("train", tmp_path)
    test = load_movielens("test", tmp_path)
    by_time = sorted(RATINGS, key=lambda r: r[3])
    assert test.sparse.tolist() == [[5, 12]]
    assert train.sparse.tolist() == [[u, m] for u, m, _, _ in by_time[:10]]
    assert train.labels.tolist() == [1.0 if r >= 4 else 0.0 for _, _, r, _ in by_time[:10]]
    assert train.dense.shape == (10, 0) and train.dense.dtype == torch.float32
    assert train.table_sizes == test.table_sizes == (6, 32)
    assert train.name == "movielens"


def test_positive_at_and_half_star_ratings(tmp_path: Path) -> None:
    rows = [(1, 1, 3.5, 1), (1, 2, 4.5, 2), (2, 1, 3.0, 3)]
    _write(tmp_path, "ratings.csv", _format("ratings.csv", rows))
    assert load_movielens("train", tmp_path).labels.tolist() == [0.0, 1.0, 0.0]
    assert load_movielens("train", tmp_path, positive_at=3.5).labels.tolist() == [1.0, 1.0, 0.0]


def test_timestamp_ties_keep_file_order(tmp_path: Path) -> None:
    rows = [(u, 1, 5.0, 100) for u in range(20)]
    _write(tmp_path, "u.data", _format("u.data", rows))
    assert load_movielens("test", tmp_path).sparse[:, 0].tolist() == [18, 19]


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("ratings.dat", "1::2::3::4\n1::2::3\n", r"ratings.dat:2: expected 4 fields"),
        (
            "ratings.dat",
            "1::2::3::4\n1::x::3::4\n",
            "ratings.dat:2: movie id must be an integer, got 'x'$",
        ),
        ("ratings.dat", "1::2::3::4\n1.5::2::3::4\n", "ratings.dat:2: user id must be an integer"),
        ("u.data", "1\t2\t3\t4\n\n1\t2\t3\t4\n", r"u.data:2: expected 4 fields"),
        ("u.data", "-1\t2\t3\t4\n", r"u.data:1: user id must be in \[0, 9223372036854775806\]"),
        ("u.data", f"{10**23}\t2\t3\t4\n", r"u.data:1: user id must be in \[0, "),
        ("u.data", f"1\t{2**63 - 1}\t3\t4\n", r"u.data:1: movie id must be in \[0, "),
        ("u.data", f"1\t2\t3\t{2**63}\n", r"u.data:1: timestamp must be in \[-9223372036854775808"),
        ("u.data", f"1\t{'9' * 5000}\t3\t4\n", r"u.data:1: movie id must be in \[0, "),
        ("u.data", "1\t2\tgood\t4\n", "u.data:1: rating must be a number, got 'good'$"),
        ("u.data", "1\t2\tnan\t4\n", "u.data:1: rating must be a finite number"),
        ("ratings.dat", "1::2::9::3\n", "ratings.dat:1: rating must be 0.5 to 5 stars, got '9'$"),
        ("ratings.dat", "1::2::0::3\n", "ratings.dat:1: rating must be 0.5 to 5 stars, got '0'$"),
        # Python's int() and float() read "1_0" as 10: no ratings file writes that.
        ("ratings.dat", "1_0::2::3::4\n", "ratings.dat:1: user id must be an integer"),
        ("ratings.dat", "1::2::4_5::4\n", "ratings.dat:1: rating must be a number"),
        ("u.data", "1\t2\t3\t1_000\n", "u.data:1: timestamp must be an integer"),
        # A leading separator is an empty first field, not whitespace to strip.
        ("u.data", "\t1\t2\t3\t4\n", r"u.data:1: expected 4 fields separated by '\\t', got 5"),
        (
            "ratings.csv",
            "user,movie,rating,time\n1,2,3,4\n",
            # The header as text, not a bytes literal.
            "ratings.csv:1: expected header 'userId,movieId,rating,timestamp', got "
            "'user,movie,rating,time'$",
        ),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.0,4\n1;2;3;4\n", "csv:3:"),
    ],
)
def test_malformed_files_name_the_file_and_line(
    tmp_path: Path, name: str, text: str, match: str
) -> None:
    _write(tmp_path, name, text)
    for check in (load_movielens, check_movielens_split):
        with pytest.raises(ValueError, match=match) as info:
            check("train", tmp_path)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["ratings.dat", "ratings.csv", "u.data"])
def test_the_check_passes_every_line_loading_reads(tmp_path: Path, name: str) -> None:
    """Lines the check's pattern for plain digits does not take are parsed as loading parses
    them: signs, spaces, exponents, long ids and timestamps, many decimals, CRLF, no newline."""
    separator = {"ratings.dat": "::", "ratings.csv": ",", "u.data": "\t"}[name]
    unusual = [
        ["+3", " 7 ", "4e0", "1000 "],
        [str(2**63 - 2), "7", "4.0000001", str(-(2**63))],
        ["3", "7", "0004.5", "1" + "0" * 18],
    ]
    text = _format(name, RATINGS) + "".join(separator.join(f) + "\r\n" for f in unusual)
    _write(tmp_path, name, text + separator.join(["1", "2", "3", "4"]))  # no final newline
    assert len(load_movielens("train", tmp_path)) + len(load_movielens("test", tmp_path)) == 15
    check_movielens_split("train", tmp_path)
    check_movielens_split("test", tmp_path)


@pytest.mark.parametrize("name", ["ratings.dat", "ratings.csv", "u.data"])
def test_blank_lines_that_end_the_file_are_not_ratings(tmp_path: Path, name: str) -> None:
    """As editors and exporters leave them; a blank line before a rating stays an error."""
    _write(tmp_path, name, _format(name, RATINGS) + "\n\r\n  \n")
    assert len(load_movielens("train", tmp_path)) + len(load_movielens("test", tmp_path)) == 11
    check_movielens_split("train", tmp_path)
    check_movielens_split("test", tmp_path)


@pytest.mark.parametrize("name", ["ratings.dat", "ratings.csv", "u.data"])
def test_an_id_too_large_for_a_table_of_the_width_names_its_line(tmp_path: Path, name) -> None:
    # A table holds the largest id + 1 rows; torch sizes a tensor to at most 2**63 - 1 bytes:
    # with 16 float32 values a row, ids up to 2**63 // 64 - 2.
    largest = 2**63 // 64 - 2
    rows = [*RATINGS[:4], (largest, 7, 4.0, 1004), *RATINGS[5:]]
    path = _write(tmp_path, name, _format(name, rows))
    check_movielens_split("train", tmp_path, embedding_dim=16)
    assert load_movielens("train", tmp_path).table_sizes == (largest + 1, 32)
    line = 6 if name == "ratings.csv" else 5  # after the header
    for width, movie in ((17, 7), (16, largest + 1), (16, 9 * 10**18)):
        rows[4] = (largest, movie, 4.0, 1004)
        _write(tmp_path, name, _format(name, rows))
        field, value = ("user id", largest) if width == 17 else ("movie id", movie)
        with pytest.raises(ValueError) as info:
            check_movielens_split("test", tmp_path, embedding_dim=width)
        message = str(info.value)
        assert message.startswith(f"{path}:{line}: {field} {value} is too large for a dlrm")
        assert f"ids must be <= {(2**63 - 1) // (4 * width) - 1}" in message and "\n" not in message
        check_movielens_split("test", tmp_path)  # the file's format takes any int64 id


@pytest.mark.parametrize("name", ["ratings.dat", "ratings.csv", "u.data"])
def test_an_empty_split_names_the_file_with_or_without_parsing_it(tmp_path: Path, name) -> None:
    path = _write(tmp_path, name, _format(name, RATINGS[:9]))
    assert len(load_movielens("train", tmp_path)) == 9
    check_movielens_split("train", tmp_path)
    message = "the MovieLens test split .* is empty: the file holds 9 ratings, it needs at least 10"
    for check in (load_movielens, check_movielens_split):
        with pytest.raises(ValueError, match=message) as info:
            check("test", tmp_path)
        assert str(info.value).startswith(f"{path}: ")
    _write(tmp_path, name, _format(name, []))
    for check in (load_movielens, check_movielens_split):
        with pytest.raises(ValueError, match="holds no ratings: the MovieLens train split is"):
            check("train", tmp_path)


def test_missing_or_several_files_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match=r"ratings\.dat, ratings\.csv, u\.data"):
        load_movielens("train", tmp_path)
    _write(tmp_path, "u.data", _format("u.data", RATINGS))
    _write(tmp_path, "ratings.dat", _format("ratings.dat", RATINGS))
    with pytest.raises(ValueError, match="several MovieLens ratings files"):
        load_movielens("train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_movielens("valid", tmp_path)
