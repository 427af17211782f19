"""Resuming a model-parallel run: its shards' checkpoints live in one folder per parameter
group (``checkpoints/group-stageI/``); they are found and checked before anything starts, and
a corrupt one, or a partition's folder missing beside the others, is refused naming its file
or folder, without loading torch. So is a Sandblaster run's missing commit record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distbelief.config import JobConfig
from distbelief.errors import CheckpointError, ConfigFieldError
from distbelief.launch.cli import main
from distbelief.launch.local import LocalCluster
from distbelief.launch.resume import STAGE_GROUP_PREFIX, read_run_for_resume
from distbelief.pipeline.job import stage_group
from distbelief.sealed_json import write_sealed_json
from distbelief.server import ParameterShard, server_optimizer_factory
from distbelief.server.checkpoint import save_checkpoint
from distbelief.server.checkpoint_meta import LAUNCHED_PARTITIONER
from distbelief.server.groups import group_dir
from distbelief.server.row_checkpoint import save_row_tables
from distbelief.sharding import FlatPartitioner, RowAlignedPartitioner, TensorSpec

SPECS = [TensorSpec("3.weight", (4, 2), torch.float32)]


def _run_with_group_checkpoints(run_dir, *, trained: bool = True) -> None:
    config = JobConfig.from_fields(
        {"pipeline.num_partitions": 2, "pipeline.split_points": (3,), "cluster.num_shards": 1}
    )
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json())
    for group in ("stage0", "stage1"):
        shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
        shard.initialize(SPECS, [torch.arange(8, dtype=torch.float32)])
        if trained:
            shard.push([torch.ones(8)])
        save_checkpoint(shard.snapshot(), run_dir / "checkpoints" / f"group-{group}")


def test_a_run_whose_checkpoints_are_in_group_folders_resumes(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    config = read_run_for_resume(run_dir)
    assert config.pipeline.split_points == (3,)
    assert config.reporting.out_dir == str(run_dir)


def test_a_corrupt_group_checkpoint_is_refused_by_name(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    [tensors] = (run_dir / "checkpoints" / "group-stage1").glob("*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"oops")
    with pytest.raises(CheckpointError, match=f"{tensors}: corrupt"):
        read_run_for_resume(run_dir)


def test_a_checkpoint_of_another_shard_is_refused_by_name(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    folder = run_dir / "checkpoints" / "group-stage0"
    meta = json.loads((folder / "shard0.json").read_text())
    # Whole, with its own digest: a file that another shard wrote.
    write_sealed_json(folder / "shard0.json", meta | {"shard_id": 1, "num_shards": 2})
    expected = r"shard0\.json: holds shard 1 of 2, expected shard 0 of 1"
    with pytest.raises(CheckpointError, match=expected):
        read_run_for_resume(run_dir)


_CHECK_WITHOUT_TORCH = """
import sys
from pathlib import Path
from distbelief.errors import CheckpointError, ConfigFieldError
from distbelief.launch.resume import read_run_for_resume
try:
    read_run_for_resume(Path(sys.argv[1]))
except CheckpointError as e:
    print("refused:", e)
print("torch loaded:", "torch" in sys.modules)
"""


def test_the_check_before_a_resume_reads_the_files_without_torch(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    command = [sys.executable, "-c", _CHECK_WITHOUT_TORCH, str(run_dir)]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert checked.stdout.splitlines() == ["torch loaded: False"], checked.stderr
    [tensors] = (run_dir / "checkpoints" / "group-stage0").glob("*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-7])
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.stdout.splitlines() == [
        f"refused: --resume {run_dir}: cannot resume: {tensors}: corrupt "
        f"(SHA-256 does not match {tensors.parent / 'shard0.json'})",
        "torch loaded: False",
    ], refused.stderr


def test_a_checkpoint_without_what_the_shard_reads_is_refused_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    path = run_dir / "checkpoints" / "group-stage1" / "shard0.json"
    meta = json.loads(path.read_text())
    del meta["values"]
    write_sealed_json(path, meta)  # whole, with its own digest: written without them
    with pytest.raises(CheckpointError, match=r"shard0\.json: unreadable checkpoint: no values"):
        read_run_for_resume(run_dir)


def _run_with_two_shards(run_dir, *, rows: bool = False, trained: bool = True) -> None:
    """A finished 2-shard run's folder: each shard's checkpoint (and row tables, ``rows``);
    one stopped before its first step, ``trained`` False."""
    from tests.unit.test_row_checkpoint import _trained

    config = JobConfig.from_fields({"cluster.num_shards": 2})
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json())
    for shard_id in range(2):
        shard = ParameterShard(shard_id, 2, server_optimizer_factory("sgd", lr=0.1))
        shard.initialize(SPECS, [torch.arange(4, dtype=torch.float32) + 4 * shard_id])
        if trained:
            shard.push([torch.ones(4)])
        save_checkpoint(shard.snapshot(), run_dir / "checkpoints")
        if rows:
            tables = {"emb": _trained().state_dict()}
            save_row_tables(run_dir / "checkpoints", shard_id, 2, 3, tables, chunk_rows=4)


@pytest.mark.parametrize("rows", [False, True], ids=["dense", "rows"])
def test_a_shard_whose_checkpoint_is_missing_is_refused_by_name(tmp_path, rows):
    """Resumed, that shard would start again from the model's initial values (silently,
    beside shards that go on from theirs)."""
    run_dir = tmp_path / "run"
    _run_with_two_shards(run_dir, rows=rows)
    assert read_run_for_resume(run_dir).cluster.num_shards == 2
    missing = run_dir / "checkpoints" / ("rows-shard1.json" if rows else "shard1.json")
    missing.unlink()
    with pytest.raises(CheckpointError, match=f"{missing}: missing .* shard 1 would start again"):
        read_run_for_resume(run_dir)


def test_a_run_stopped_before_one_shard_saved_and_before_any_trained_resumes(tmp_path):
    """Ctrl-C before the first step, between the shards' saves of their initial values: the
    shard that had not saved yet starts from them again, as a new run's would."""
    run_dir = tmp_path / "run"
    _run_with_two_shards(run_dir, trained=False)
    (run_dir / "checkpoints" / "shard1.json").unlink()
    assert read_run_for_resume(run_dir).cluster.num_shards == 2


def test_a_corrupt_row_chunk_is_refused_by_name_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_two_shards(run_dir, rows=True)
    chunk = sorted((run_dir / "checkpoints").glob("rows-shard1-*.safetensors"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"oops")
    with pytest.raises(CheckpointError, match=f"{chunk}: corrupt"):
        read_run_for_resume(run_dir)


def test_a_group_folder_without_checkpoints_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    for path in (run_dir / "checkpoints" / "group-stage1").iterdir():
        path.unlink()
    with pytest.raises(CheckpointError, match="group-stage1: holds no shard checkpoints"):
        read_run_for_resume(run_dir)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_partition_whose_group_folder_is_missing_is_refused_by_name(tmp_path, stage):
    """Resumed, that partition would start again from the model's initial values (silently,
    beside the other partition's shards, which go on from theirs)."""
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir)
    missing = run_dir / "checkpoints" / f"group-stage{stage}"
    for path in missing.iterdir():
        path.unlink()
    missing.rmdir()
    expected = f"{missing}: missing .* partition {stage} would start again from scratch"
    with pytest.raises(CheckpointError, match=expected):
        read_run_for_resume(run_dir)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_run_stopped_before_one_partition_saved_and_before_any_trained_resumes(tmp_path, stage):
    """Ctrl-C before the first step: one partition's shards had saved their initial values,
    the other's nothing. Refused, the run could neither resume nor start again (its folder
    holds checkpoints): no partition trained, so the missing one starts as the others do."""
    run_dir = tmp_path / "run"
    _run_with_group_checkpoints(run_dir, trained=False)
    missing = run_dir / "checkpoints" / f"group-stage{stage}"
    for path in missing.iterdir():
        path.unlink()
    if stage == 0:
        missing.rmdir()  # not made, or made and left empty: both
    assert read_run_for_resume(run_dir).pipeline.split_points == (3,)


def test_the_resume_check_names_the_folders_the_stages_save_into(tmp_path):
    for stage in range(3):
        named = group_dir(tmp_path, stage_group(stage))
        assert named == tmp_path / f"{STAGE_GROUP_PREFIX}{stage}"


def test_a_sandblaster_run_without_its_commit_record_is_refused_by_name(tmp_path):
    run_dir = tmp_path / "run"
    config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster", "cluster.num_shards": 1})
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json())
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
    shard.initialize(SPECS, [torch.arange(8, dtype=torch.float32)])
    save_checkpoint(shard.snapshot(), run_dir / "checkpoints" / "lbfgs-000003")
    record = run_dir / "checkpoints" / "coordinator.json"
    expected = f"{record}: missing .* shards' checkpoints in {record.parent / 'lbfgs-000003'}"
    with pytest.raises(CheckpointError, match=expected):
        read_run_for_resume(run_dir)


def test_a_new_run_does_not_take_a_folder_of_sandblaster_checkpoints(tmp_path, capsys):
    """Its commit record lost, a Sandblaster run's checkpoints are still another run's: a new
    run there would delete them at its first commit."""
    from distbelief.launch.cli import main

    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
    shard.initialize(SPECS, [torch.arange(8, dtype=torch.float32)])
    run_dir = tmp_path / "my run"  # the command it advises quotes the folder's space
    save_checkpoint(shard.snapshot(), run_dir / "checkpoints" / "lbfgs-000003")
    (run_dir / "config.json").write_text(JobConfig().to_json())
    assert main(["train", "--no-eval", "--out", str(run_dir)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"holds another run's checkpoints: use --resume '{run_dir}'" in last, last


@pytest.mark.parametrize("inside", ["lbfgs-000003", "mine/run"])
def test_a_new_run_is_not_made_inside_another_runs_checkpoints(tmp_path, capsys, inside):
    """A run made in a Sandblaster run's checkpoints folder (under the name of an iteration
    folder its coordinator had pruned) was removed whole by that run's next resume."""
    from distbelief.launch.cli import main

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(JobConfig().to_json())
    out = run_dir / "checkpoints" / inside
    assert main(["train", "--no-eval", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"distbelief train: error: --out {out}: inside the checkpoints folder of run {run_dir}, "
        "whose resumes and reshards remove what they do not keep there: give another folder"
    )
    assert sorted(path.name for path in run_dir.rglob("*")) == ["checkpoints", "config.json"]


@pytest.mark.parametrize("folder", ["checkpoints", "."], ids=["in-checkpoints", "itself"])
def test_a_new_run_does_not_take_checkpoints_of_no_run(tmp_path, capsys, folder):
    """Checkpoints without a config.json beside them (a ``distbelief ps --checkpoint-dir``
    folder, or one under it) are refused too, and without the advice to resume them, which
    --resume refuses (not a run folder). The ps folder itself was taken: the run wrote its
    records and checkpoints beside the shards' own."""
    from distbelief.launch.cli import main

    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))
    shard.initialize(SPECS, [torch.arange(8, dtype=torch.float32)])
    save_checkpoint(shard.snapshot(), tmp_path / "run" / folder)
    before = sorted(path.name for path in (tmp_path / "run").rglob("*"))
    assert main(["train", "--no-eval", "--out", str(tmp_path / "run")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"distbelief train: error: --out {tmp_path / 'run'} holds checkpoints of no run (no "
        "config.json beside them: a `distbelief ps --checkpoint-dir` folder's?), which a new "
        "run would mix its own with: give another folder"
    )
    assert sorted(path.name for path in (tmp_path / "run").rglob("*")) == before


def test_a_new_run_does_not_write_over_records_of_no_run(tmp_path, capsys):
    """A metrics.csv without a config.json beside it (an ``eval --out`` watch's rows) is no
    run's: a new run there wrote its own over it."""
    from distbelief.launch.cli import main

    run_dir = tmp_path / "watched"
    run_dir.mkdir()
    rows = "time_s,role,rank,version,test_accuracy\n1.0,evaluator,0,5,0.5\n"
    (run_dir / "metrics.csv").write_text(rows)
    assert main(["train", "--no-eval", "--out", str(run_dir)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"distbelief train: error: --out {run_dir} holds a metrics.csv of no run (an `eval --out` "
        "watch's?), which a new run would write over: give another folder"
    )
    assert [path.name for path in run_dir.iterdir()] == ["metrics.csv"]
    assert (run_dir / "metrics.csv").read_text() == rows


def _corrupt_tensor_file(checkpoints) -> str:
    [tensors] = checkpoints.glob("shard1-v*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"oops")
    return f"{tensors}: corrupt (SHA-256 does not match {checkpoints / 'shard1.json'})"


def _edit_version(checkpoints) -> str:
    path = checkpoints / "shard1.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(meta | {"version": meta["version"] + 40}, indent=1))
    return f"{path}: corrupt (its fields do not match the SHA-256 it holds)"


@pytest.mark.parametrize("damage", [_corrupt_tensor_file, _edit_version], ids=["tensors", "json"])
def test_a_hand_edited_version_is_refused_as_a_corrupt_tensor_file_is(tmp_path, capsys, damage):
    """In one line naming the file, exit 2, before anything in the run folder changes."""
    from distbelief.launch.cli import main

    run_dir = tmp_path / "run"
    _run_with_two_shards(run_dir)
    said = damage(run_dir / "checkpoints")
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"distbelief train: error: --resume {run_dir}: cannot resume: {said}"
    ]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def _run_saved_with_row_aligned_cuts(run_dir) -> None:
    """A 2-shard run's folder whose checkpoints a shard divided with the row-aligned
    partitioner (the library's; the launcher's shards divide with the flat one)."""
    config = JobConfig.from_fields({"cluster.num_shards": 2})
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json())
    for shard_id in range(2):
        optimizer = server_optimizer_factory("sgd", lr=0.1)
        shard = ParameterShard(shard_id, 2, optimizer, partitioner=RowAlignedPartitioner())
        shard.initialize(SPECS, [torch.arange(4, dtype=torch.float32) + 4 * shard_id])
        save_checkpoint(shard.snapshot(), run_dir / "checkpoints")


@pytest.fixture
def nothing_starts(monkeypatch):
    def start(*args, **kwargs):
        raise AssertionError("a process was started for a refused resume")

    monkeypatch.setattr(LocalCluster, "start", start)


@pytest.mark.parametrize("shards", [[], ["--shards", "3"]], ids=["as-is", "resharded"])
def test_a_checkpoint_of_another_partitioner_is_refused_before_anything_changes(
    tmp_path, nothing_starts, capsys, shards
):
    # The started shards would refuse it; resharded first, the folder would be rewritten.
    run_dir = tmp_path / "run"
    _run_saved_with_row_aligned_cuts(run_dir)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    assert main(["train", "--resume", str(run_dir), *shards]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"distbelief train: error: --resume {run_dir}: cannot resume: "
        f"{run_dir / 'checkpoints' / 'shard0.json'}: saved with partitioner "
        '{"kind": "row-aligned"}; the job\'s shards divide the parameters with '
        '{"kind": "flat"} and would not restore it'
    ]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_reshard_refuses_a_checkpoint_of_another_partitioner_and_changes_nothing(tmp_path, capsys):
    # Re-cut with its own partitioner, the new set would still be one the job's shards refuse.
    run_dir = tmp_path / "run"
    _run_saved_with_row_aligned_cuts(run_dir)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    assert main(["reshard", str(run_dir), "--shards", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"distbelief reshard: error: {run_dir}: cannot reshard: "
        f"{run_dir / 'checkpoints' / 'shard0.json'}: saved with partitioner "
        '{"kind": "row-aligned"}; the job\'s shards divide the parameters with '
        '{"kind": "flat"} and would not restore it'
    ]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_a_resharded_resume_of_another_models_checkpoints_changes_nothing(
    tmp_path, nothing_starts, capsys
):
    # config.json names lenet; the checkpoints hold another model: refused before the reshard.
    run_dir = tmp_path / "run"
    _run_with_two_shards(run_dir)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    assert main(["train", "--resume", str(run_dir), "--shards", "3"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"distbelief train: error: --resume {run_dir}: cannot resume: ")
    assert "shard0.json holds another model's parameters than 'lenet'" in line
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


def test_the_partitioner_read_without_torch_is_the_launched_shards():
    assert FlatPartitioner().to_json() == LAUNCHED_PARTITIONER


def test_resume_of_a_missing_run_folder_is_refused_and_makes_no_folder(tmp_path) -> None:
    """``train(config, resume=True)`` from a script, as ``train --resume`` on the command line:
    a folder that is not there is named, and not made (it was left behind, empty)."""
    from distbelief.launch import train

    run_dir = tmp_path / "nope"
    config = JobConfig.from_fields({"reporting.out_dir": str(run_dir)})
    with pytest.raises(ValueError, match=rf"--resume {run_dir}: no such run folder"):
        train(config, resume=True)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda train: train({"cluster": {}}), TypeError, "^config must be a JobConfig, got dict$"),
        (
            lambda train: train(JobConfig(), resume="yes"),
            TypeError,
            "^resume must be True or False, got 'yes'$",
        ),
        (
            lambda train: train(JobConfig.from_fields({"embeddings.row_lr": 0.1})),
            ConfigFieldError,
            "embeddings.row_lr",
        ),
        (
            lambda train: train(JobConfig(), cluster_type="local"),
            TypeError,
            r"^cluster_type must be a Cluster class \(LocalCluster, RayCluster\), got 'local'$",
        ),
        (
            lambda train: train(JobConfig(), cluster_type=dict),
            TypeError,
            r"^cluster_type must be a Cluster class .* got <class 'dict'>$",
        ),
    ],
    ids=["config", "resume", "row-setting", "cluster-type", "cluster-class"],
)
def test_train_from_a_script_refuses_what_the_command_line_refuses(call, error, message) -> None:
    """``train()`` checks its arguments as ``distbelief train`` checks its flags, before
    anything starts: a dict for the config was an AttributeError, and a row setting for a
    model without tables (lenet) was ignored without a word."""
    from distbelief.launch import train

    with pytest.raises(error, match=message):
        call(train)


def test_the_clusters_and_a_subclass_of_one_are_cluster_classes() -> None:
    """``Cluster`` is a protocol, which ``issubclass`` cannot check: ``train()`` asks for its
    methods, which the project's clusters (and a test's subclass of one) have."""
    from distbelief.launch.cluster import cluster_methods_lacking
    from distbelief.launch.local import LocalCluster
    from distbelief.launch.ray_cluster import RayCluster

    class Killing(LocalCluster):
        pass

    assert [cluster_methods_lacking(c) for c in (LocalCluster, RayCluster, Killing)] == [[]] * 3
    assert "start" in cluster_methods_lacking(dict)


def test_only_a_runs_checkpoints_folder_as_the_file_system_finds_it_holds_an_out(tmp_path):
    """Any config.json beside a folder named checkpoints counted, and the path was read as
    typed: ``RUN/checkpoints/../../c`` (which is ``c``) was refused, a link into a run's
    checkpoints let through."""
    from distbelief.launch.job import _run_whose_checkpoints_hold

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(JobConfig().to_json())
    assert _run_whose_checkpoints_hold(run_dir / "checkpoints" / "x") == run_dir
    assert _run_whose_checkpoints_hold(run_dir / "checkpoints" / ".." / ".." / "c") is None
    (tmp_path / "link").symlink_to(run_dir / "checkpoints")
    assert _run_whose_checkpoints_hold(tmp_path / "link" / "x") == run_dir
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.json").write_text('{"model": "bert"}')  # no run's
    assert _run_whose_checkpoints_hold(other / "checkpoints" / "x") is None
