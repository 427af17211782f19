"""Unit tests for distbelief.data.criteo, on tiny files written in the Criteo TSV format."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import torch

from distbelief.data.criteo import (
    MISSING_RAW_ID,
    check_criteo_split,
    criteo_table_sizes,
    load_criteo,
    read_criteo,
)
from distbelief.errors import DatasetUnavailableError


def _line(label: str = "1", dense: list[str] | None = None, cats: list[str] | None = None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *dense, *cats]) + "\n"


def _rows(num_rows: int) -> list[str]:
    """Row r has label r % 2, I1 = r, C1 = r in hex."""
    return [
        _line(str(r % 2), [str(r)] + [""] * 12, [f"{r:08x}"] + ["a1b2c3d4"] * 25)
        for r in range(num_rows)
    ]


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(lines).encode()
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


def test_reads_fields_with_the_dense_transform_and_hex_ids(tmp_path: Path) -> None:
    dense = ["", "-3", "0", "1", "7", "123456", *([""] * 7)]
    cats = ["", "FFFFFFFF", "0000000a", *(["68fd1e64"] * 23)]
    path = _write(tmp_path / "day.txt", [_line("0", dense, cats), _line()])
    dataset = read_criteo(path)
    assert len(dataset) == 2 and dataset.name == "criteo"
    assert dataset.labels.tolist() == [0.0, 1.0]
    assert dataset.dense.dtype == torch.float32 and dataset.dense.shape == (2, 13)
    expected = [0.0, 0.0, 0.0, math.log(2), math.log(8), math.log(123457)] + [0.0] * 7
    assert dataset.dense[0].tolist() == pytest.approx(expected)
    assert dataset.sparse[0, :4].tolist() == [MISSING_RAW_ID, 2**32 - 1, 10, 0x68FD1E64]
    assert dataset.sparse[1].tolist() == list(range(26))
    assert dataset.table_sizes == (2**32 + 1,) * 26


def test_num_embeddings_folds_ids_and_keeps_the_last_row_for_missing(tmp_path: Path) -> None:
    cats = ["", "0000000b", "0000000a", *(["00000003"] * 23)]
    path = _write(tmp_path / "day.tsv", [_line("1", None, cats)])
    dataset = read_criteo(path, num_embeddings=11)
    assert dataset.sparse[0, :4].tolist() == [10, 1, 0, 3]
    assert dataset.table_sizes == (11,) * 26
    per_table = [5] * 25 + [100]
    assert read_criteo(path, num_embeddings=per_table).table_sizes == tuple(per_table)


@pytest.mark.parametrize("num_embeddings", [1, [10] * 25, [10] * 25 + [0]])
def test_bad_num_embeddings(num_embeddings: object) -> None:
    with pytest.raises(ValueError, match="num_embeddings"):
        criteo_table_sizes(num_embeddings)  # type: ignore[arg-type]


def test_gzip_reads_like_plain_text_and_max_rows_stops_early(tmp_path: Path) -> None:
    rows = _rows(7)
    plain = read_criteo(_write(tmp_path / "a.txt", rows))
    packed = read_criteo(_write(tmp_path / "a.txt.gz", rows))
    assert torch.equal(plain.sparse, packed.sparse) and torch.equal(plain.dense, packed.dense)
    # A malformed line after max_rows is never read.
    first = read_criteo(_write(tmp_path / "b.txt", [*rows, "junk\n"]), max_rows=3)
    assert first.sparse[:, 0].tolist() == [0, 1, 2]
    skipped = read_criteo(tmp_path / "a.txt", first_row=5)
    assert skipped.sparse[:, 0].tolist() == [5, 6]


def test_crlf_line_endings_and_a_missing_final_newline(tmp_path: Path) -> None:
    lines = [_line().replace("\n", "\r\n"), _line("0").rstrip("\n")]
    assert read_criteo(_write(tmp_path / "a.txt", lines)).labels.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        (
            "\t".join(["0"] * 13 + ["00000000"] * 26) + "\n",
            r"expected 40 tab-separated fields, got 39 \(no label column",
        ),
        ("\n", "expected 40 tab-separated fields, got 1"),
        (_line("2"), "label must be 0 or 1, got '2'$"),
        (_line("1", ["1.5"] + ["0"] * 12), "I1 must be an integer"),
        (_line("1", ["0", "9" * 20] + ["0"] * 11), "I2 must be an integer of at most 19 digits"),
        (
            _line("1", ["-" + "9" * 400] + ["0"] * 12),
            "I1 must be an integer of at most 19 digits or empty, got '-9{29}'\\.\\.\\.$",
        ),
        (
            _line("1", None, ["xyz"] + ["00000000"] * 25),
            "C1 must be 8 hex digits or empty, got 'xyz'$",
        ),
        (_line("1", None, ["00000000"] * 25 + ["0x123456"]), "C26 must be 8 hex digits"),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path: Path, bad_line: str, match: str) -> None:
    path = _write(tmp_path / "day.txt", [_line(), _line(), bad_line, _line()])
    with pytest.raises(ValueError, match=f"day.txt:3: {match}") as info:
        read_criteo(path)
    assert "\n" not in str(info.value)
    _write(tmp_path / "criteo" / "train.txt", [*_rows(26), bad_line, *_rows(3)])
    with pytest.raises(ValueError, match=f"train.txt:27: {match}"):
        check_criteo_split("train", tmp_path)  # the train split: lines 1 to 27 of 30
    check_criteo_split("test", tmp_path)  # lines 28 to 30, well formed


@pytest.mark.parametrize("name", ["train.txt", "train.txt.gz"])
def test_blank_lines_that_end_the_file_are_not_rows(tmp_path: Path, name: str) -> None:
    """As editors and exporters leave them: not counted into the test split's last tenth."""
    _write(tmp_path / "criteo" / name, [*_rows(25), "\n", "\r\n"])
    assert check_criteo_split("train", tmp_path) == 23
    assert check_criteo_split("test", tmp_path) == 2
    assert load_criteo("train", tmp_path).sparse[:, 0].tolist() == list(range(23))
    assert load_criteo("test", tmp_path).sparse[:, 0].tolist() == [23, 24]


def test_the_check_reads_each_splits_rows(tmp_path: Path) -> None:
    """Without a test file, test is train's last tenth: each split's check reads its own rows."""
    bad = _line("2")
    _write(tmp_path / "criteo" / "train.txt.gz", [*_rows(28), bad, *_rows(1)])
    check_criteo_split("train", tmp_path)
    with pytest.raises(ValueError, match=r"train\.txt\.gz:29: label must be 0 or 1"):
        check_criteo_split("test", tmp_path)
    _write(tmp_path / "criteo" / "test.tsv", [*_rows(3), bad])
    with pytest.raises(ValueError, match=r"train\.txt\.gz:29: label must be 0 or 1"):
        check_criteo_split("train", tmp_path)  # now the whole of train.txt.gz
    with pytest.raises(ValueError, match=r"test\.tsv:4: label must be 0 or 1"):
        check_criteo_split("test", tmp_path)


def test_corrupt_gzip_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "day.txt.gz"
    path.write_bytes(gzip.compress(_line().encode() * 50)[:-20])
    with pytest.raises(ValueError, match=r"day\.txt\.gz: not a valid gzip file"):
        read_criteo(path)


def test_one_train_file_splits_its_last_tenth_off_as_test(tmp_path: Path) -> None:
    _write(tmp_path / "criteo" / "train.txt", _rows(25))
    train = load_criteo("train", tmp_path)
    test = load_criteo("test", tmp_path)
    assert train.sparse[:, 0].tolist() == list(range(23))
    assert test.sparse[:, 0].tolist() == [23, 24]
    check_criteo_split("train", tmp_path)
    check_criteo_split("test", tmp_path)
    assert load_criteo("train", tmp_path, max_rows=20).sparse[:, 0].tolist() == list(range(18))
    assert load_criteo("test", tmp_path, max_rows=20).sparse[:, 0].tolist() == [18, 19]


def test_a_test_file_is_used_as_it_is(tmp_path: Path) -> None:
    _write(tmp_path / "criteo" / "train.txt.gz", _rows(5))
    _write(tmp_path / "criteo" / "test.tsv", _rows(3))
    assert len(load_criteo("train", tmp_path)) == 5
    assert len(load_criteo("test", tmp_path, num_embeddings=100)) == 3


def test_a_folder_named_as_a_split_file_is_refused_not_passed_over(tmp_path: Path) -> None:
    # Passed over, test.txt/ would make test of train's last tenth without a word.
    _write(tmp_path / "criteo" / "train.txt", _rows(25))
    (tmp_path / "criteo" / "test.txt").mkdir()
    for check in (load_criteo, check_criteo_split):
        for split in ("train", "test"):
            with pytest.raises(ValueError, match=r"criteo/test.txt: not a file"):
                check(split, tmp_path)


def test_dense_values_of_up_to_19_digits_read(tmp_path: Path) -> None:
    path = _write(tmp_path / "day.txt", [_line("1", ["9" * 19, "-" + "9" * 19] + ["0"] * 11)])
    dense = read_criteo(path).dense[0, :2].tolist()
    assert dense == pytest.approx([math.log1p(1e19), 0.0])


@pytest.mark.parametrize(
    ("files", "split", "bad_file", "problem"),
    [
        (
            {"train.txt": 9},
            "test",
            "train.txt",
            "the Criteo test split (without a test file, the last 10% of train's 9 rows, "
            "rounded down) is empty: it needs at least 10 rows, or a test file",
        ),
        ({"train.txt": 9, "test.txt.gz": 0}, "test", "test.txt.gz", "holds no rows: the Criteo"),
        ({"train.tsv": 0, "test.txt": 3}, "train", "train.tsv", "holds no rows: the Criteo train"),
        ({"train.txt.gz": 0}, "test", "train.txt.gz", "holds no rows: the Criteo test split"),
    ],
    ids=["train-too-small", "empty-test-file", "empty-train-file", "empty-shared-file"],
)
def test_an_empty_split_names_the_file_with_or_without_parsing_it(
    tmp_path: Path, files: dict, split: str, bad_file: str, problem: str
) -> None:
    for name, num_rows in files.items():
        _write(tmp_path / "criteo" / name, _rows(num_rows))
    for check in (load_criteo, check_criteo_split):
        with pytest.raises(ValueError) as info:
            check(split, tmp_path)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / 'criteo' / bad_file}: ") and problem in message


def test_missing_files_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match=r"train\.txt"):
        load_criteo("train", tmp_path)
    with pytest.raises(DatasetUnavailableError, match="or train"):
        load_criteo("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_criteo("valid", tmp_path)
    with pytest.raises(ValueError, match="max_rows"):
        load_criteo("train", tmp_path, max_rows=-1)
