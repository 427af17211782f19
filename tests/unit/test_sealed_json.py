"""Checkpoint metadata that checks itself: what is written reads back as whole (whatever JSON
makes of its values), a field changed afterwards is refused naming the file, a file written
before the digest is taken; and Sandblaster's commit record carries the same check."""

from __future__ import annotations

import json
import math
import re

import pytest

from distbelief.coordinator.checkpoint import RECORD_FILE, commit, read_record
from distbelief.errors import CheckpointError
from distbelief.sealed_json import DIGEST_KEY, check_sealed, write_sealed_json

CORRUPT = "corrupt (its fields do not match the SHA-256 it holds)"


def test_what_is_written_reads_back_whole(tmp_path):
    # Tuples come back as lists, int keys as strings (sorted otherwise), NaN as NaN.
    fields = {"b": (1, 2.5), "a": {10: "x", 2: [None, True]}, "loss": math.nan, "top": 1e-320}
    path = tmp_path / "meta.json"
    write_sealed_json(path, fields)
    read = json.loads(path.read_text())
    check_sealed(read, path)
    assert DIGEST_KEY in read and set(read) == {*fields, DIGEST_KEY}
    assert not list(tmp_path.glob(".*tmp"))  # written to a temporary file, then renamed


@pytest.mark.parametrize(
    "change",
    [{"version": 8}, {"extra": 1}, {DIGEST_KEY: "0" * 64}],
    ids=["edited", "added", "digest"],
)
def test_a_field_changed_afterwards_is_refused_naming_the_file(tmp_path, change):
    path = tmp_path / "meta.json"
    write_sealed_json(path, {"version": 7, "tensor_file": "t.safetensors"})
    edited = json.loads(path.read_text()) | change
    with pytest.raises(CheckpointError, match=f"^{re.escape(f'{path}: {CORRUPT}')}$"):
        check_sealed(edited, path)


def test_a_field_removed_is_refused_but_a_file_without_a_digest_is_taken(tmp_path):
    path = tmp_path / "meta.json"
    write_sealed_json(path, {"version": 7, "num_shards": 2})
    read = json.loads(path.read_text())
    del read["num_shards"]
    with pytest.raises(CheckpointError, match="corrupt"):
        check_sealed(read, path)
    check_sealed({"version": 7, "num_shards": 2}, path)  # written before the digest


def test_an_edited_commit_record_is_refused_and_an_old_one_is_read(tmp_path):
    (tmp_path / "lbfgs-000004").mkdir()
    commit(tmp_path, "lbfgs-000004", 4, {"loss": 0.25, "history": [[1.0, 2.0]]})
    record = read_record(tmp_path)
    assert (record["iteration"], record["state"]["loss"]) == (4, 0.25)
    path = tmp_path / RECORD_FILE
    path.write_text(json.dumps(record | {"iteration": 9}))
    with pytest.raises(CheckpointError, match=f"{path}: corrupt"):
        read_record(tmp_path)
    del record[DIGEST_KEY]  # as commit records were written before the digest
    path.write_text(json.dumps(record | {"iteration": 9}))
    assert read_record(tmp_path)["iteration"] == 9
