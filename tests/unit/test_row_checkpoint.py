"""Row table checkpoints: exact round trip in chunks, a reloaded table behaves like the saved
one, the checksum, atomic saves, and damage named by file (a chunk edited and given matching
digests too, from its header, before a resume starts anything)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distbelief.errors import CheckpointError
from distbelief.files import sha256_file
from distbelief.sealed_json import write_sealed_json
from distbelief.server import checkpoint as checkpoint_module
from distbelief.server.checkpoint_meta import check_rows_meta
from distbelief.server.row_checkpoint import (
    load_row_tables,
    merge_checksums,
    rows_meta_path,
    save_row_tables,
    table_checksum,
)
from distbelief.server.row_chunk_layout import check_row_chunks
from distbelief.server.row_optimizers import LazyAdam, RowAdagrad, RowSGD, RowWiseAdagrad
from distbelief.server.row_table import RowTable

DIM = 3
OPTIMIZERS = {
    "sgd": lambda: RowSGD(0.1),
    "adagrad": lambda: RowAdagrad(0.1, initial_accumulator_value=0.1),
    "rowwise_adagrad": lambda: RowWiseAdagrad(0.1),
    "lazy_adam": lambda: LazyAdam(0.01),
}


def _table(optimizer: str = "lazy_adam") -> RowTable:
    return RowTable(
        DIM, OPTIMIZERS[optimizer](), admit_after=2, max_rows=12, ttl_steps=6, init="normal"
    )


def _push_steps(table: RowTable, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        ids = torch.randperm(30, generator=generator)[:7].to(torch.int64) - 5
        table.push(ids, torch.randn(7, DIM, generator=generator))


def _trained(optimizer: str = "lazy_adam") -> RowTable:
    table = _table(optimizer)
    _push_steps(table, range(20))
    assert table.num_rows and table.num_pending and table.num_evicted  # every kind of state
    return table


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() - {"settings"} == b.keys() - {"settings"}
    for key, value in a.items():
        if key == "state":
            assert value.keys() == b[key].keys()
            for name, tensor in value.items():
                assert torch.equal(tensor, b[key][name]), name
        elif isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        elif key != "settings":
            assert value == b[key], key


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_round_trip_in_chunks_and_the_loaded_table_continues_identically(tmp_path, optimizer):
    table = _trained(optimizer)
    settings = {"admit_after": 2, "init": "normal"}
    save_row_tables(
        tmp_path, 1, 2, 7, {"emb": {**table.state_dict(), "settings": settings}}, chunk_rows=4
    )
    loaded = load_row_tables(tmp_path, 1)
    assert (loaded.shard_id, loaded.num_shards, loaded.version, loaded.chunk_rows) == (1, 2, 7, 4)
    _assert_same(table.state_dict(), loaded.tables["emb"])
    assert loaded.tables["emb"]["settings"] == settings
    meta = json.loads(rows_meta_path(tmp_path, 1).read_text())["tables"]["emb"]
    assert len(meta["row_chunks"]) == -(-table.num_rows // 4) and meta["pending_chunks"]

    restored = _table(optimizer)
    restored.load_state_dict(loaded.tables["emb"])
    _push_steps(table, range(20, 40))
    _push_steps(restored, range(20, 40))
    _assert_same(table.state_dict(), restored.state_dict())
    probe = torch.arange(-5, 25, dtype=torch.int64)
    assert torch.equal(table.pull(probe), restored.pull(probe))


def test_empty_tables_and_no_checkpoint(tmp_path):
    assert load_row_tables(tmp_path, 0) is None
    empty = _table().state_dict()
    save_row_tables(tmp_path, 0, 1, 0, {"a": empty, "b": _table("sgd").state_dict()})
    loaded = load_row_tables(tmp_path, 0)
    _assert_same(empty, loaded.tables["a"])
    assert loaded.tables["a"]["state"]["exp_avg"].shape == (0, DIM)
    assert loaded.tables["b"]["settings"] == {}


def _subset(state: dict, rows: torch.Tensor, *, pending: bool) -> dict:
    keep = slice(None) if pending else slice(0, 0)
    return {
        **state,
        **{key: state[key][rows] for key in ("ids", "values", "last_step")},
        "state": {name: tensor[rows] for name, tensor in state["state"].items()},
        **{key: state[key][keep] for key in ("pending_ids", "pending_counts", "pending_last_step")},
    }


def test_checksum_ignores_row_order_and_sees_every_bit():
    state = _trained().state_dict()
    checksum = table_checksum(state)
    order = torch.randperm(state["ids"].numel())
    assert table_checksum(_subset(state, order, pending=True)) == checksum
    halves = [_subset(state, order[:5], pending=True), _subset(state, order[5:], pending=False)]
    assert merge_checksums(table_checksum(half) for half in halves) == checksum
    flipped = state["state"]["exp_avg"].clone()
    flipped.view(torch.int32)[2, 1] ^= 1  # one bit of one state value
    assert table_checksum({**state, "state": {**state["state"], "exp_avg": flipped}}) != checksum
    older = state["last_step"].clone()
    older[0] -= 1
    assert table_checksum({**state, "last_step": older}) != checksum


def test_a_new_save_replaces_the_old_files_and_a_failed_one_leaves_them(tmp_path, monkeypatch):
    table = _trained()
    save_row_tables(tmp_path, 0, 1, 3, {"emb": table.state_dict()}, chunk_rows=2)
    first = sorted(path.name for path in tmp_path.iterdir())
    save_row_tables(tmp_path, 0, 1, 3, {"emb": table.state_dict()}, chunk_rows=2)  # same version
    second = sorted(path.name for path in tmp_path.iterdir())
    assert len(second) == len(first) and set(second) & set(first) == {"rows-shard0.json"}

    calls = []
    real_save = checkpoint_module.save_file

    def failing_save(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            # How safetensors reports a full disk: its own error, seen here as an OSError.
            raise SafetensorError("Error while serializing: No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    _push_steps(table, range(20, 25))
    with pytest.raises(OSError, match="No space left on device"):
        save_row_tables(tmp_path, 0, 1, 4, {"emb": table.state_dict()}, chunk_rows=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == second
    assert load_row_tables(tmp_path, 0).version == 3


def _saved(tmp_path) -> dict:
    save_row_tables(tmp_path, 0, 1, 1, {"emb": _trained().state_dict()}, chunk_rows=4)
    return json.loads(rows_meta_path(tmp_path, 0).read_text())


def test_pending_chunks_without_a_last_step_load_as_pushed_at_the_tables_last_step(tmp_path):
    # Pending chunks once held ids and counts only, and the checksum left ages out.
    meta = _saved(tmp_path)
    entry = meta["tables"]["emb"]
    num_steps = entry["num_steps"]
    for chunk in entry["pending_chunks"]:
        path = tmp_path / chunk["file"]
        tensors = load_file(str(path))
        del tensors["last_step"]
        save_file(tensors, str(path))
        chunk["sha256"] = sha256_file(path)
    state = _trained().state_dict()
    as_then = {**state, "pending_last_step": torch.full_like(state["pending_ids"], num_steps)}
    entry["checksum"] = table_checksum(as_then)
    write_sealed_json(rows_meta_path(tmp_path, 0), meta)

    loaded = load_row_tables(tmp_path, 0).tables["emb"]
    assert torch.equal(loaded["pending_ids"], state["pending_ids"])
    assert torch.equal(loaded["pending_last_step"], as_then["pending_last_step"])
    restored = _table()
    restored.load_state_dict(loaded)
    assert restored.num_pending == state["pending_ids"].numel()
    check_row_chunks(tmp_path, 0)  # and the check before a resume takes them


def test_a_corrupt_chunk_is_named(tmp_path):
    chunk = tmp_path / _saved(tmp_path)["tables"]["emb"]["row_chunks"][1]["file"]
    data = bytearray(chunk.read_bytes())
    data[-2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"{chunk}: corrupt")):
        load_row_tables(tmp_path, 0)


def test_a_missing_chunk_is_named(tmp_path):
    name = _saved(tmp_path)["tables"]["emb"]["pending_chunks"][0]["file"]
    (tmp_path / name).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"names {name}, which is missing")):
        load_row_tables(tmp_path, 0)


def test_a_checksum_that_does_not_match_is_named(tmp_path):
    meta = _saved(tmp_path)
    meta["tables"]["emb"]["checksum"]["rows_digest"] += 1
    write_sealed_json(rows_meta_path(tmp_path, 0), meta)  # the JSON whole, its rows not
    with pytest.raises(CheckpointError, match=r"rows-shard0\.json: table 'emb': rows do not match"):
        load_row_tables(tmp_path, 0)


def test_a_truncated_json_is_named(tmp_path):
    _saved(tmp_path)
    path = rows_meta_path(tmp_path, 0)
    path.write_text(path.read_text()[:50])
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: unreadable row checkpoint")):
        load_row_tables(tmp_path, 0)


def test_bad_state_dicts_are_refused_by_name(tmp_path):
    state = _trained().state_dict()
    with pytest.raises(ValueError, match="row table 'emb': values does not match"):
        save_row_tables(tmp_path, 0, 1, 0, {"emb": {**state, "values": state["values"][1:]}})
    with pytest.raises(ValueError, match="settings are not JSON-able"):
        save_row_tables(tmp_path, 0, 1, 0, {"emb": {**state, "settings": {"f": object()}}})
    with pytest.raises(ValueError, match="shard_id 2 is not in"):
        save_row_tables(tmp_path, 2, 2, 0, {})
    assert not any(tmp_path.iterdir())


def test_metadata_edited_by_hand_is_refused_as_corrupt_by_name(tmp_path):
    meta = _saved(tmp_path)
    assert "meta_sha256" in meta
    path = rows_meta_path(tmp_path, 0)
    path.write_text(json.dumps(meta | {"version": meta["version"] + 1}))
    expected = f"{path}: corrupt (its fields do not match the SHA-256 it holds)"
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$"):
        load_row_tables(tmp_path, 0)
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$"):
        check_rows_meta(tmp_path, 0)  # the check before a resume, torch-free


def test_row_tables_written_without_a_metadata_digest_still_load(tmp_path):
    meta = _saved(tmp_path)
    del meta["meta_sha256"]  # as row checkpoints were written before the digest
    rows_meta_path(tmp_path, 0).write_text(json.dumps(meta))
    loaded = load_row_tables(tmp_path, 0)
    assert loaded.version == 1
    _assert_same(loaded.tables["emb"], _trained().state_dict())
    assert check_rows_meta(tmp_path, 0) == (0, 1)


def reseal_row_chunk(directory: Path, shard_id: int, chunk: Path) -> None:
    """Give ``chunk``, edited, its new SHA-256 in shard ``shard_id``'s row JSON and seal that,
    as a hand that knows the format would: every digest matches."""
    path = rows_meta_path(directory, shard_id)
    meta = json.loads(path.read_text())
    for entry in meta["tables"].values():
        for listed in (*entry["row_chunks"], *entry["pending_chunks"]):
            if listed["file"] == chunk.name:
                listed["sha256"] = sha256_file(chunk)
    write_sealed_json(path, meta)


def edit_row_chunk(chunk: Path, edit: Callable[[dict], object]) -> None:
    """Change the tensors of the chunk file ``chunk`` with ``edit`` (then reseal it)."""
    tensors = load_file(str(chunk))
    edit(tensors)
    save_file(tensors, str(chunk))


def _past_the_file(chunk: Path) -> None:
    data = chunk.read_bytes()
    chunk.write_bytes((len(data) - 7).to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize(
    ("kind", "damage", "said"),
    [
        (
            "row_chunks",
            lambda c: edit_row_chunk(c, lambda t: t.update({"vals": t.pop("values")})),
            "tensor 'values' is missing",
        ),
        (
            "row_chunks",
            lambda c: edit_row_chunk(c, lambda t: t.pop("state.exp_avg_sq")),
            "tensor 'state.exp_avg_sq' is missing",
        ),
        (
            "row_chunks",
            lambda c: edit_row_chunk(c, lambda t: t.update({"extra": t["ids"].clone()})),
            "unexpected tensor 'extra'",
        ),
        (
            "row_chunks",
            lambda c: edit_row_chunk(c, lambda t: t.update({"values": t["values"].double()})),
            "tensor 'values' is float64 [4, 3], not float32 [4, 3]",
        ),
        (
            "row_chunks",
            lambda c: edit_row_chunk(c, lambda t: t.update({"values": t["values"][:, :2].clone()})),
            "tensor 'values' is float32 [4, 2], not float32 [4, 3]",
        ),
        (
            "pending_chunks",
            lambda c: edit_row_chunk(c, lambda t: t.update({"counts": t["counts"][1:].clone()})),
            "tensor 'counts' is int64 [3], not int64 [4]",
        ),
        ("row_chunks", _past_the_file, "unreadable tensor file: a header of"),
    ],
    ids=["renamed", "missing", "extra", "dtype", "shape", "pending-shape", "header-past-the-file"],
)
def test_a_chunk_edited_and_resealed_is_refused_from_its_header(tmp_path, kind, damage, said):
    """Its digests match: the header's tensors, dtypes and shapes tell, before a resume starts
    anything (``check_row_chunks``) and before a shard loads the chunk."""
    chunk = tmp_path / _saved(tmp_path)["tables"]["emb"][kind][0]["file"]  # 4 rows
    damage(chunk)
    reseal_row_chunk(tmp_path, 0, chunk)
    assert check_rows_meta(tmp_path, 0) == (0, 1)  # every digest matches
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(chunk))}: .*{re.escape(said)}"):
        check_row_chunks(tmp_path, 0)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(chunk))}: .*{re.escape(said)}"):
        load_row_tables(tmp_path, 0)
