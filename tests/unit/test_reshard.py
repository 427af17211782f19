"""Resharding a stopped run: 2 -> 3 -> 1 shards keeps every parameter, optimizer state, row and
row state; restored shards hold the right slices and continue as the old ones would; damaged
checkpoints are named and change nothing; Sandblaster's layout; the command line."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from distbelief.config import JobConfig
from distbelief.coordinator.checkpoint import commit
from distbelief.errors import CheckpointError
from distbelief.launch import reshard as reshard_module
from distbelief.launch.cli import main
from distbelief.launch.reshard import reshard_run
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server.checkpoint import load_checkpoint, save_checkpoint
from distbelief.server.reshard_dense import assemble_model, split_model
from distbelief.server.reshard_rows import reshard_row_tables
from distbelief.server.row_checkpoint import (
    RowTablesCheckpoint,
    load_row_tables,
    save_row_tables,
)
from distbelief.server.row_optimizers import LazyAdam, RowAdagrad
from distbelief.server.row_table import RowTable
from distbelief.sharding import (
    FlatLayout,
    FlatPartitioner,
    ParameterGroupPartitioner,
    TensorSpec,
)
from distbelief.sharding.layout import group_sizes
from distbelief.sharding.rows import row_shard, split_by_shard

SPECS = [
    TensorSpec("w", (9, 5), torch.float32),
    TensorSpec("scale", (3,), torch.float64),
    TensorSpec("b", (5,), torch.float32),
]
FOLDERS = {  # checkpoint folder -> (server optimizer, partitioner: the launched shards')
    ".": ("adam", FlatPartitioner()),
    "group-stage1": ("momentum", FlatPartitioner()),
}
OPTIM_KEYS = {"adam": ("exp_avg", "exp_avg_sq", "step"), "momentum": ("momentum_buffer",)}
TABLES = {
    "users": lambda: RowTable(4, LazyAdam(0.01), admit_after=2, ttl_steps=4, init="normal"),
    "items": lambda: RowTable(2, RowAdagrad(0.1, initial_accumulator_value=0.1)),
}
DIMS = {"users": 4, "items": 2}


def _make_shards(num_shards: int, optimizer: str, partitioner) -> list[ParameterShard]:
    torch.manual_seed(0)
    flats = FlatLayout(SPECS).flatten([torch.randn(s.shape, dtype=s.dtype) for s in SPECS])
    shards = []
    for shard_id, pieces in enumerate(partitioner.partition(SPECS, num_shards)):
        factory = server_optimizer_factory(optimizer, lr=0.05)
        shard = ParameterShard(shard_id, num_shards, factory, partitioner=partitioner)
        shard.initialize(SPECS, [flats[p.dtype][p.start : p.stop] for p in pieces])
        shards.append(shard)
    return shards


def _restore(folder: Path, num_shards: int, optimizer: str, partitioner) -> list[ParameterShard]:
    shards = []
    for shard_id in range(num_shards):
        factory = server_optimizer_factory(optimizer, lr=0.05)
        shard = ParameterShard(shard_id, num_shards, factory, partitioner=partitioner)
        shard.restore(load_checkpoint(folder, shard_id))
        shards.append(shard)
    return shards


def _push_dense(shards: list[ParameterShard], step: int) -> None:
    """One whole-model gradient, each shard pushed its slices of it."""
    generator = torch.Generator().manual_seed(100 + step)
    whole = {
        dtype: torch.randn(total, generator=generator, dtype=dtype)
        for dtype, total in group_sizes(SPECS).items()
    }
    for shard in shards:
        shard.push([whole[p.dtype][p.start : p.stop].clone() for p in shard.slices])


def _whole(shards: list[ParameterShard]) -> dict[str, torch.Tensor]:
    """Buffers (parameters first) and optimizer state put back together from the slices."""
    whole: dict[str, torch.Tensor] = {}
    for shard in shards:
        state = shard.store.optimizer.state_dict()["state"]
        for index, piece in enumerate(shard.slices):
            buffers = {name: shard.store.get(name)[index] for name in shard.store.names()}
            entries = {**buffers, **state.get(index, {})}
            for key, tensor in entries.items():
                name = f"{key}/{piece.dtype}"
                if tensor.dim() == 0:
                    assert whole.setdefault(name, tensor).equal(tensor)
                    continue
                size = group_sizes(SPECS)[piece.dtype]
                whole.setdefault(name, torch.zeros(size, dtype=tensor.dtype))
                whole[name][piece.start : piece.stop] = tensor
    return whole


def _assert_whole_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def _push_rows(tables: list[dict[str, RowTable]], step: int) -> None:
    """One global batch per table, each shard pushed the ids it owns (maybe none)."""
    generator = torch.Generator().manual_seed(step)
    for name in tables[0]:
        dim = DIMS[name]
        ids = torch.randperm(40, generator=generator)[:9].to(torch.int64) - 10
        grads = torch.randn(ids.numel(), dim, generator=generator)
        for shard_tables, (positions, shard_ids) in zip(
            tables, split_by_shard(ids, len(tables)), strict=True
        ):
            shard_tables[name].push(shard_ids, grads[positions])


def _rows(tables: list[dict]) -> dict[str, dict]:
    """Per table, every shard's rows by id: values, state and age; pending counts and ages."""
    merged: dict[str, dict] = {}
    for shard_tables in tables:
        for name, state in shard_tables.items():
            entry = merged.setdefault(name, {"rows": {}, "pending": {}})
            for position, row_id in enumerate(state["ids"].tolist()):
                entry["rows"][row_id] = (
                    state["values"][position],
                    {key: t[position] for key, t in state["state"].items()},
                    int(state["num_steps"]) - int(state["last_step"][position]),
                )
            ages = int(state["num_steps"]) - state["pending_last_step"]
            pending = zip(
                state["pending_ids"].tolist(),
                zip(state["pending_counts"].tolist(), ages.tolist(), strict=True),
                strict=True,
            )
            entry["pending"].update(pending)
    return merged


def _assert_rows_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]["pending"] == b[name]["pending"]
        assert a[name]["rows"].keys() == b[name]["rows"].keys()
        for row_id, (values, state, age) in a[name]["rows"].items():
            other = b[name]["rows"][row_id]
            assert torch.equal(values, other[0]) and age == other[2]
            assert all(torch.equal(t, other[1][key]) for key, t in state.items())


def _state_dicts(tables: list[dict[str, RowTable]]) -> list[dict]:
    return [{name: table.state_dict() for name, table in shard.items()} for shard in tables]


def _load_rows(folder: Path, num_shards: int) -> list[dict]:
    return [load_row_tables(folder, shard_id).tables for shard_id in range(num_shards)]


@pytest.fixture
def run(tmp_path):
    """A stopped run of 2 shards: dense checkpoints in two folders, row tables in one."""
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    dense = {}
    for folder, (optimizer, partitioner) in FOLDERS.items():
        shards = _make_shards(2, optimizer, partitioner)
        for step in range(3):
            _push_dense(shards, step)
        for shard in shards:
            save_checkpoint(shard.snapshot(), root / folder)
        dense[folder] = shards
    tables = [{name: make() for name, make in TABLES.items()} for _ in range(2)]
    for step in range(12):
        _push_rows(tables, step)
    users = [shard_tables["users"] for shard_tables in tables]
    assert all(t.num_rows and t.num_pending and t.num_evicted for t in users)  # every kind
    for shard_id, shard_tables in enumerate(tables):
        states = {
            name: {**t.state_dict(), "settings": {"k": 1}} for name, t in shard_tables.items()
        }
        save_row_tables(root, shard_id, 2, 3, states, chunk_rows=5)
    config = JobConfig.from_fields({"cluster.num_shards": 2, "reporting.out_dir": str(run_dir)})
    (run_dir / "config.json").write_text(config.to_json())
    return run_dir, dense, tables


def _check_run(run_dir: Path, dense: dict, tables: list[dict], num_shards: int) -> None:
    root = run_dir / "checkpoints"
    for folder, (optimizer, partitioner) in FOLDERS.items():
        restored = _restore(root / folder, num_shards, optimizer, partitioner)
        for shard_id, shard in enumerate(restored):
            assert shard.slices == partitioner.partition(SPECS, num_shards)[shard_id]
        whole = _whole(restored)
        _assert_whole_equal(whole, _whole(dense[folder]))
        assert {name.partition("/")[0] for name in whole} == {"param", *OPTIM_KEYS[optimizer]}
        assert all(shard.version == 3 for shard in restored)
    new_rows = _load_rows(root, num_shards)
    _assert_rows_equal(_rows(new_rows), _rows(_state_dicts(tables)))
    for shard_id, shard_tables in enumerate(new_rows):
        for state in shard_tables.values():
            assert bool((row_shard(state["ids"], num_shards) == shard_id).all())
            assert state["settings"] == {"k": 1} and state["num_steps"] == 12
            assert state["num_admitted"] - state["num_evicted"] == state["ids"].numel()
    for name in TABLES:
        for key in ("num_admitted", "num_evicted"):
            old = sum(getattr(shard_tables[name], key) for shard_tables in tables)
            assert sum(shard_tables[name][key] for shard_tables in new_rows) == old
    config = JobConfig.from_file(run_dir / "config.json")
    assert config.cluster.num_shards == num_shards
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoints", "config.json"]


def test_two_to_three_to_one_keeps_everything(run):
    run_dir, dense, tables = run
    for num_shards, old in ((3, 2), (1, 3)):
        summary = reshard_run(run_dir, num_shards)
        assert (summary.old_num_shards, summary.num_shards) == (old, num_shards)
        assert (summary.num_folders, summary.num_dense_tensors, summary.num_tables) == (2, 6, 2)
        _check_run(run_dir, dense, tables, num_shards)


def test_resharded_shards_and_tables_continue_as_the_old_ones(run):
    run_dir, dense, tables = run
    reshard_run(run_dir, 3)
    root = run_dir / "checkpoints"
    for folder, (optimizer, partitioner) in FOLDERS.items():
        restored = _restore(root / folder, 3, optimizer, partitioner)
        for step in range(3, 6):
            _push_dense(dense[folder], step)
            _push_dense(restored, step)
        _assert_whole_equal(_whole(restored), _whole(dense[folder]))
    new_tables = []
    for shard_tables in _load_rows(root, 3):
        new_tables.append({name: TABLES[name]() for name in TABLES})
        for name, state in shard_tables.items():
            new_tables[-1][name].load_state_dict(state)
    for step in range(12, 24):
        _push_rows(tables, step)
        _push_rows(new_tables, step)
    _assert_rows_equal(_rows(_state_dicts(tables)), _rows(_state_dicts(new_tables)))


def test_unequal_table_steps_take_the_largest_and_keep_row_ages():
    tables = [{"users": TABLES["users"]()} for _ in range(2)]
    for step in range(6):
        _push_rows(tables, step)
    ahead = next(i for i in range(100, 200) if int(row_shard(torch.tensor([i]), 2)) == 0)
    tables[0]["users"].push(torch.tensor([ahead]), torch.ones(1, 4))  # shard 0 a step ahead
    old = [
        RowTablesCheckpoint(shard_id=i, num_shards=2, version=1, chunk_rows=8, tables=state)
        for i, state in enumerate([{"users": t["users"].state_dict()} for t in tables])
    ]
    new = reshard_row_tables(old, 3)
    assert all(shard["users"]["num_steps"] == 7 for shard in new)
    _assert_rows_equal(_rows(new), _rows([checkpoint.tables for checkpoint in old]))


def _snapshot(run_dir: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(run_dir)): path.read_bytes() if path.is_file() else None
        for path in sorted(run_dir.rglob("*"))
    }


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _row_chunk(root: Path, shard_id: int, index: int = 0) -> Path:
    meta = json.loads((root / f"rows-shard{shard_id}.json").read_text())
    return root / meta["tables"]["users"]["row_chunks"][index]["file"]


def _corrupt_row_chunk(root: Path) -> str:
    path = _row_chunk(root, 1)
    _corrupt(path)
    return f"{path}: corrupt"


def _delete_row_chunk(root: Path) -> str:
    path = _row_chunk(root, 0, 1)
    path.unlink()
    return f"{root / 'rows-shard0.json'}: names {path.name}, which is missing"


def _delete_shard_json(root: Path) -> str:
    (root / "shard1.json").unlink()
    return f"{root / 'shard1.json'}: missing"


def _delete_rows_json(root: Path) -> str:
    (root / "rows-shard1.json").unlink()
    return f"{root / 'rows-shard1.json'}: missing"


def _corrupt_group_tensors(root: Path) -> str:
    path = next((root / "group-stage1").glob("shard0-v*.safetensors"))
    _corrupt(path)
    return f"{path}: corrupt"


def _stray_shard(root: Path) -> str:
    (root / "shard2.json").write_bytes((root / "shard1.json").read_bytes())
    return f"{root / 'shard2.json'}: shard 2, but the run has 2 shards"


def _drop_optimizer_field(root: Path) -> str:
    # Damage that keeps both digests right (the files rewritten and sealed again): shard 1's
    # slice lacks one of Adam's moments, which the new set would fill with zeros.
    state = load_checkpoint(root, 1)
    del state.tensors["optim.0.exp_avg"]
    save_checkpoint(state, root)
    return "shard1.json: slice 0's optimizer state lacks 'exp_avg'"


@pytest.mark.parametrize(
    "damage",
    [
        _drop_optimizer_field,
        _stray_shard,
        _corrupt_row_chunk,
        _delete_row_chunk,
        _delete_shard_json,
        _delete_rows_json,
        _corrupt_group_tensors,
    ],
)
def test_damage_is_named_and_changes_nothing(run, damage):
    run_dir = run[0]
    expected = damage(run_dir / "checkpoints")
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError) as error:
        reshard_run(run_dir, 3)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert _snapshot(run_dir) == before


def test_a_new_set_that_differs_is_refused_and_changes_nothing(run, monkeypatch):
    run_dir = run[0]
    before = _snapshot(run_dir)
    real_split, real_rows = reshard_module.split_model, reshard_module.reshard_row_tables

    def lossy_split(model, num_shards):
        states = real_split(model, num_shards)
        states[1].tensors["param.0"][0] += 1.0
        return states

    def lossy_rows(checkpoints, num_shards):
        new = real_rows(checkpoints, num_shards)
        table = new[0]["items"]
        new[0]["items"] = {**table, "values": table["values"] * 2}
        return new

    monkeypatch.setattr(reshard_module, "split_model", lossy_split)
    with pytest.raises(CheckpointError, match="checkpoints differ: buffer 'param'"):
        reshard_run(run_dir, 3)
    assert _snapshot(run_dir) == before
    monkeypatch.setattr(reshard_module, "split_model", real_split)
    monkeypatch.setattr(reshard_module, "reshard_row_tables", lossy_rows)
    with pytest.raises(CheckpointError, match="row table 'items' differs"):
        reshard_run(run_dir, 3)
    assert _snapshot(run_dir) == before


def test_a_model_is_cut_again_with_the_partitioner_its_shards_held():
    # The pure re-cut keeps any partitioner (a library's shards'); reshard_run refuses one the
    # launched shards do not divide with (tests/unit/test_resume_groups.py).
    partitioner = ParameterGroupPartitioner(FlatPartitioner(), ["w", "scale"])
    shards = _make_shards(2, "momentum", partitioner)
    for step in range(3):
        _push_dense(shards, step)
    new = split_model(assemble_model([shard.snapshot() for shard in shards]), 3)
    restored = []
    for state in new:
        factory = server_optimizer_factory("momentum", lr=0.05)
        shard = ParameterShard(state.shard_id, 3, factory, partitioner=partitioner)
        shard.restore(state)
        assert shard.slices == partitioner.partition(SPECS, 3)[state.shard_id]
        restored.append(shard)
    _assert_whole_equal(_whole(restored), _whole(shards))


def test_optimizer_steps_that_differ_take_the_largest(caplog):
    shards = _make_shards(2, "adam", FlatPartitioner())
    for step in range(3):
        _push_dense(shards, step)
    shards[0].push([torch.zeros(p.numel, dtype=p.dtype) for p in shards[0].slices])
    new = split_model(assemble_model([shard.snapshot() for shard in shards]), 3)
    assert all(float(state.tensors["optim.0.step"]) == 4.0 for state in new)
    assert all(state.version == 4 for state in new)
    assert "optimizer state 'step' differs" in caplog.text


def test_an_interrupted_swap_is_named(run):
    run_dir = run[0]
    (run_dir / "checkpoints").rename(run_dir / "checkpoints.old-1234")
    with pytest.raises(CheckpointError, match=r"rename checkpoints\.old-1234 back to checkpoints"):
        reshard_run(run_dir, 3)


def _ctrl_c_inside(module, name: str, monkeypatch) -> list[str]:
    """Makes ``module.name`` send this process SIGINT (as a Ctrl-C would) each time it is
    called, then run as before; returns the list each call is noted in."""
    calls: list[str] = []
    original = getattr(module, name)

    def with_ctrl_c(*args, **kwargs):
        calls.append(name)
        signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, with_ctrl_c)
    return calls


@pytest.mark.parametrize(
    ("module", "name"),
    [(reshard_module, "sync_folder"), (reshard_module.ReshardSummary, "line")],
    ids=["mid-swap", "printing-its-line"],
)
def test_a_ctrl_c_once_the_swap_has_begun_leaves_the_reshard_done(
    run, module, name, monkeypatch, capsys
):
    """Mid-swap, a Ctrl-C cut the renames (checkpoints of one shard count, config.json of the
    other); just after, it made a reshard that was done exit 130. Both finish now: exit 0, the
    line printed, the new set and its config in place, nothing set aside."""
    run_dir = run[0]
    calls = _ctrl_c_inside(module, name, monkeypatch)
    assert main(["reshard", str(run_dir), "--shards", "3"]) == 0
    assert calls == [name]
    assert capsys.readouterr().out.startswith(f"resharded {run_dir}: 2 -> 3 shards")
    assert JobConfig.from_file(run_dir / "config.json").cluster.num_shards == 3
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.json"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_ctrl_c_before_the_swap_stops_the_reshard_and_changes_nothing(run, monkeypatch):
    run_dir = run[0]
    before = _snapshot(run_dir)
    calls = _ctrl_c_inside(reshard_module, "_verify_folder", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        reshard_run(run_dir, 3)
    assert calls == ["_verify_folder"]
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize(
    "argv",
    [["train", "--resume", "RUN"], ["train", "--out", "RUN", "--no-eval"]],
    ids=["resume", "out"],
)
def test_a_run_left_by_an_interrupted_swap_is_not_taken_for_a_new_one(run, argv, capsys):
    """Its checkpoints set aside by a reshard killed mid-swap, a run is told where they are:
    ``--resume`` does not call it a run that saved none (and send the user to ``--out``), and
    ``--out`` does not start a new run over its records."""
    run_dir = run[0]
    (run_dir / "checkpoints").rename(run_dir / "checkpoints.old-1234")
    before = _snapshot(run_dir)
    argv = [str(run_dir) if arg == "RUN" else arg for arg in argv]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"distbelief train: error: {argv[1]} {run_dir}: "), last
    assert last.endswith(
        f"{run_dir / 'checkpoints'} is missing and {run_dir / 'checkpoints.old-1234'} is "
        "there: a reshard was interrupted; rename checkpoints.old-1234 back to checkpoints"
    ), last
    assert _snapshot(run_dir) == before


def test_what_a_reshard_killed_before_its_swap_left_is_removed_by_the_next(run):
    """A reshard killed while it wrote the new set leaves that set, half-written, and the new
    config.json's temporary: the next reshard of the folder removes them, and only them."""
    run_dir, dense, tables = run
    staging = run_dir / "checkpoints.reshard-k1ll3d00"
    shutil.copytree(run_dir / "checkpoints", staging)
    (run_dir / ".config.json.x7q2p9aa.tmp").write_text("{")
    reshard_run(run_dir, 3)
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoints", "config.json"]
    _check_run(run_dir, dense, tables, 3)


def test_sandblaster_runs_reshard_their_committed_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    shards = _make_shards(2, "sgd", FlatPartitioner())
    for shard in shards:
        shard.store.add("direction", [torch.randn(p.numel, dtype=p.dtype) for p in shard.slices])
        save_checkpoint(shard.snapshot(), root / "lbfgs-000003")
    commit(root, "lbfgs-000003", 3, {"iteration": 3})
    save_checkpoint(shards[0].snapshot(), root / "lbfgs-000004")  # not committed: dropped
    config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster", "cluster.num_shards": 2})
    (run_dir / "config.json").write_text(config.to_json())
    record = (root / "coordinator.json").read_bytes()

    reshard_run(run_dir, 3)
    assert sorted(p.name for p in root.iterdir()) == ["coordinator.json", "lbfgs-000003"]
    assert (root / "coordinator.json").read_bytes() == record
    restored = _restore(root / "lbfgs-000003", 3, "sgd", FlatPartitioner())
    whole = _whole(restored)
    assert {name.partition("/")[0] for name in whole} == {"param", "direction"}
    _assert_whole_equal(whole, _whole(shards))


def test_command_line(run, capsys):
    run_dir = run[0]
    assert main(["reshard", str(run_dir), "--shards", "3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (
        f"resharded {run_dir}: 2 -> 3 shards; 6 dense tensors in 2 checkpoint folder(s), "
        f"2 row table(s) with {out.rsplit(' with ', 1)[1].split()[0]} rows"
    )
    assert main(["reshard", str(run_dir), "--shards", "3"]) == 2
    assert "already has 3 shards" in capsys.readouterr().err
    assert main(["reshard", str(run_dir), "--shards", "0"]) == 2
    assert "argument --shards: must be an integer >= 1, got 0" in capsys.readouterr().err
    (run_dir / "checkpoints" / "rows-shard2.json").unlink()
    assert main(["reshard", str(run_dir), "--shards", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run_dir / 'checkpoints' / 'rows-shard2.json'}: missing" in err
    assert main(["reshard", str(run_dir / "nowhere"), "--shards", "2"]) == 2
    assert "nowhere: no such run folder" in capsys.readouterr().err
    # A run with no checkpoints says so whatever count is asked for: its own count said
    # "already has 3 shards".
    shutil.rmtree(run_dir / "checkpoints")
    for count in ("3", "4"):
        assert main(["reshard", str(run_dir), "--shards", count]) == 2
        assert "no checkpoints folder to reshard" in capsys.readouterr().err


def test_a_part_past_max_rows_per_shard_is_named_in_the_reshard_line(run, capsys):
    # Onto fewer shards a part may hold more than the run's bound: kept whole (a reshard back
    # onto more shards loses nothing), cut by the shard that restores it, and said so here.
    run_dir, _, tables = run
    bound = 3
    config = JobConfig.from_file(run_dir / "config.json")
    config = config.with_fields({"embeddings.max_rows_per_shard": bound})
    (run_dir / "config.json").write_text(config.to_json())
    assert main(["reshard", str(run_dir), "--shards", "1"]) == 0
    out = capsys.readouterr().out
    [saved] = _load_rows(run_dir / "checkpoints", 1)
    counts = {name: state["ids"].numel() for name, state in saved.items()}
    table = max(counts, key=counts.get)
    assert counts[table] > bound and out.count("\n") == 1
    assert out.strip().endswith(
        f"; shard 0 holds {counts[table]} rows of table {table!r}, more than "
        f"--max-rows-per-shard {bound}: it keeps the {bound} most recently pushed when it "
        "restores them"
    )
    _assert_rows_equal(_rows([saved]), _rows(_state_dicts(tables)))  # nothing cut here
    config = config.with_fields({"embeddings.max_rows_per_shard": max(counts.values())})
    (run_dir / "config.json").write_text(config.with_fields({"cluster.num_shards": 1}).to_json())
    assert main(["reshard", str(run_dir), "--shards", "2"]) == 0
    assert "max-rows-per-shard" not in capsys.readouterr().out  # every part within it


@pytest.mark.parametrize("command", [["reshard", "--shards", "2"], ["train", "--resume"]])
def test_a_folder_that_is_not_a_run_is_named_as_given(command, tmp_path, capsys):
    # Not "<folder>/config.json: not a valid run config: [Errno 2] No such file ...".
    folder = tmp_path / "runs"
    folder.mkdir()
    assert main([*command, str(folder)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert errors[0].endswith(f"{folder}: not a run folder (it has no config.json)"), errors
    assert list(folder.iterdir()) == []


def test_resume_with_shards_and_a_refused_flag_changes_nothing(run, capsys):
    # --shards N reshards the run before it resumes: a flag the resume refuses must be refused
    # first, or the folder is rewritten for N shards by a command that then fails.
    run_dir = run[0]
    before = _snapshot(run_dir)
    assert main(["train", "--resume", str(run_dir), "--shards", "3", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "argument --lr: a resumed run keeps the value in" in err
    assert _snapshot(run_dir) == before


def test_a_missing_partition_folder_is_named_and_changes_nothing(run):
    # A job of 2 partitions keeps each one's shards in group-stageS: a reshard without one
    # would rewrite the run, which could then not resume (that partition would start afresh).
    run_dir = run[0]
    config = JobConfig.from_file(run_dir / "config.json")
    partitioned = config.with_fields({"pipeline.num_partitions": 2})
    (run_dir / "config.json").write_text(partitioned.to_json())
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError) as error:
        reshard_run(run_dir, 3)
    missing = run_dir / "checkpoints" / "group-stage0"
    assert str(error.value).startswith(f"{missing}: missing (the other partitions' are in ")
    assert _snapshot(run_dir) == before


def test_a_partitioned_run_counts_only_the_folders_holding_checkpoints(tmp_path):
    # A model-parallel job keeps every shard checkpoint in group-stageS: the run's own
    # checkpoints/ holds none, and the summary line must not count it as rewritten.
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    for stage in range(2):
        for shard in _make_shards(2, "sgd", FlatPartitioner()):
            save_checkpoint(shard.snapshot(), root / f"group-stage{stage}")
    config = JobConfig.from_fields(
        {"cluster.num_shards": 2, "pipeline.num_partitions": 2, "reporting.out_dir": str(run_dir)}
    )
    (run_dir / "config.json").write_text(config.to_json())

    summary = reshard_run(run_dir, 3)
    assert (summary.num_folders, summary.num_dense_tensors) == (2, 6)
    assert "6 dense tensors in 2 checkpoint folder(s)" in summary.line()


def test_more_shards_than_the_model_has_parameters_is_refused_naming_the_flag(run, capsys):
    # Each folder's largest dtype group is the float32 one: w and b, 50 elements (the stage's
    # folder holds the whole flat vectors too); past 50 shards shard 0 would hold none.
    run_dir = run[0]
    before = _snapshot(run_dir)
    assert main(["reshard", str(run_dir), "--shards", "51"]) == 2
    assert (
        "argument --shards: must be at most 50, the parameters of this run's smallest partition: "
        "more shards would hold none, got 51" in capsys.readouterr().err
    )
    assert main(["reshard", str(run_dir), "--shards", "2147483647"]) == 2
    assert _snapshot(run_dir) == before
    assert main(["reshard", str(run_dir), "--shards", "50"]) == 0
    assert load_checkpoint(run_dir / "checkpoints", 49) is not None


def test_a_folder_that_cannot_be_written_is_named_and_changes_nothing(run, monkeypatch):
    # A full disk (or a read-only folder) met while writing the new set: one line naming the
    # file, the old set and config.json as they were, no staging folder left.
    run_dir = run[0]
    before = _snapshot(run_dir)

    def full_disk(state, directory):
        raise OSError(28, "No space left on device", str(Path(directory) / "shard0.json"))

    monkeypatch.setattr(reshard_module, "save_checkpoint", full_disk)
    with pytest.raises(ValueError) as error:
        reshard_run(run_dir, 3)
    said = str(error.value)
    assert said.startswith(f"{run_dir}: cannot write the resharded checkpoints (")
    assert f"({run_dir / 'checkpoints' / 'shard0.json'}: No space left on device); " in said
    assert said.endswith("nothing changed")
    assert _snapshot(run_dir) == before


def test_a_run_folder_the_new_set_cannot_be_made_in_is_named_as_typed(run, monkeypatch):
    # A read-only run folder: the new set's folder cannot be made there. The error names the
    # run folder, not the random name the new folder would have had.
    run_dir = run[0]
    before = _snapshot(run_dir)

    def read_only(prefix, dir):
        raise PermissionError(13, "Permission denied", str(Path(dir) / f"{prefix}x1y2z3"))

    monkeypatch.setattr(reshard_module.tempfile, "mkdtemp", read_only)
    with pytest.raises(ValueError) as error:
        reshard_run(run_dir, 3)
    assert str(error.value) == (
        f"{run_dir}: cannot write the resharded checkpoints ({run_dir}: Permission denied); "
        "nothing changed"
    )
    assert _snapshot(run_dir) == before


def test_a_resume_that_reshards_loads_torch_with_stops_deferred(run, monkeypatch, capsys):
    """``train --resume RUN --shards N`` imported torch for its checks with signals handled
    as usual: a SIGTERM in its first second was lost (the job ran to its end), or aborted the
    launcher in torch's C code (exit 134), where ``reshard`` and ``train`` defer them."""
    from distbelief.launch import cli as cli_module

    run_dir = run[0]
    before, loaded = _snapshot(run_dir), []

    def stopped_while_loading(*modules: str):
        loaded.append(modules)
        raise KeyboardInterrupt  # the stop, taken once they are loaded

    monkeypatch.setattr(cli_module, "import_with_signals_deferred", stopped_while_loading)
    assert main(["train", "--resume", str(run_dir), "--shards", "3"]) == 130
    assert loaded[0][0] == "torch"
    assert _snapshot(run_dir) == before
