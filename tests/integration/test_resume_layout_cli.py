"""``distbelief train --resume`` of a run whose config.json no longer names the model its
checkpoints hold (edited by hand), for each kind of run the resume supports besides a whole
model's Downpour run (``test_resume_cli.py``): a model-parallel run's partitions, a click
model's row tables and Sandblaster's committed checkpoint; and of a run whose tensor file or
row chunk file was edited and given matching digests. Each is refused in one line naming the
file and what differs, exit 2, before anything in the run folder changes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from distbelief.launch.cli import main
from distbelief.server.checkpoint_meta import rows_meta_path
from tests.conftest import run_cli, run_forked
from tests.unit.test_checkpoint import edit_tensor_file
from tests.unit.test_row_checkpoint import edit_row_chunk, reseal_row_chunk

ERROR = "distbelief train: error: --resume {run}: cannot resume: "

ResumeRefused = Callable[[Path], str]


def _train(*args: str) -> None:
    result = run_forked("train", *args, "--no-plots", timeout_s=180)
    assert result.returncode == 0, result.stderr[-3000:]


def _files(run_dir: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def _refused(resume_refused: ResumeRefused, run_dir: Path, edit: Callable[[dict], None]) -> str:
    """The one line a resume prints after ``edit`` changed config.json, which must exit 2 and
    leave every file of the run as it was (config.json is put back after)."""
    path = run_dir / "config.json"
    original = path.read_text()
    config = json.loads(original)
    edit(config)
    path.write_text(json.dumps(config))
    try:
        return resume_refused(run_dir)
    finally:
        path.write_text(original)


def _refused_setting(
    resume_refused: ResumeRefused, run_dir: Path, field: str, value: object
) -> str:
    """``_refused`` with config.json's ``field`` ("section.name") set to ``value``."""
    section, name = field.split(".")
    return _refused(resume_refused, run_dir, lambda config: config[section].update({name: value}))


def _refused_tensors(
    resume_refused: ResumeRefused, run_dir: Path, folder: Path, edit: Callable[[dict], object]
) -> str:
    """``_refused`` for shard 0's tensor file in ``folder``, its tensors changed by ``edit``
    and its digests made to match (``edit_tensor_file``); the files are put back after."""
    meta = folder / "shard0.json"
    [tensor_file] = folder.glob("shard0-v*.safetensors")
    originals = {path: path.read_bytes() for path in (meta, tensor_file)}
    edit_tensor_file(folder, 0, edit)
    try:
        return resume_refused(run_dir)
    finally:
        for path, data in originals.items():
            path.write_bytes(data)


def _refused_row_chunk(
    resume_refused: ResumeRefused, run_dir: Path, edit: Callable[[dict], object]
) -> tuple[Path, int, str]:
    """``_refused`` for shard 0's first row chunk, its tensors changed by ``edit`` and its
    digests made to match (``reseal_row_chunk``); the files are put back after. Returns the
    chunk file, its number of rows and the line."""
    checkpoints = run_dir / "checkpoints"
    meta = rows_meta_path(checkpoints, 0)
    [listed, *_] = json.loads(meta.read_text())["tables"]["tables.0"]["row_chunks"]
    chunk = checkpoints / listed["file"]
    originals = {path: path.read_bytes() for path in (meta, chunk)}
    edit_row_chunk(chunk, edit)
    reseal_row_chunk(checkpoints, 0, chunk)
    try:
        return chunk, listed["num_rows"], resume_refused(run_dir)
    finally:
        for path, data in originals.items():
            path.write_bytes(data)


@pytest.fixture
def resume_refused(capsys, caplog) -> ResumeRefused:
    """The one line ``train --resume RUN`` prints, which must exit 2, change no file and log
    nothing. It runs in this process: a refusal comes before anything starts, and a process
    of its own spent most of its time importing torch."""

    def refused(run_dir: Path) -> str:
        before = _files(run_dir)
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = main(["train", "--resume", str(run_dir)])
        err = capsys.readouterr().err
        after = _files(run_dir)
        assert code == 2, err[-3000:]
        changed = {
            p.relative_to(run_dir)
            for p in before.keys() | after.keys()
            if before.get(p) != after.get(p)
        }
        assert not changed, sorted(map(str, changed))
        assert not caplog.records, caplog.text
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        return lines[0]

    return refused


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_model_parallel_run_is_refused_another_model_partition_count_or_tensor(
    tmp_path, resume_refused
):
    run_dir = tmp_path / "run"
    _train(
        *("--model", "mlp", "--partitions", "2", "--split-points", "3"),
        *("--micro-batches", "2", "--workers", "1", "--shards", "1", "--steps", "3"),
        *("--out", str(run_dir)),
    )
    checkpoints = run_dir / "checkpoints"

    # The same layers, 2048 wide.
    assert _refused_setting(resume_refused, run_dir, "model.name", "wide-mlp") == (
        ERROR.format(run=run_dir) + f"{checkpoints / 'group-stage0' / 'shard0.json'} holds "
        "another model's parameters than partition 0 of 'wide-mlp' split at [3] (its "
        "config.json's): tensor 'layers.1.weight' [2048, 1024] float32 does not match the "
        "shards' 'layers.1.weight' [256, 1024] float32"
    )

    def whole(config: dict) -> None:
        config["pipeline"].update(num_partitions=1, split_points=None, num_micro_batches=1)

    assert _refused(resume_refused, run_dir, whole) == (
        ERROR.format(run=run_dir) + f"{checkpoints / 'group-stage0' / 'shard0.json'} holds "
        "a parameter group that 'mlp' in 1 partition (its config.json's) does not use"
    )

    stage1 = checkpoints / "group-stage1"
    [tensor_file] = stage1.glob("shard0-v*.safetensors")
    assert _refused_tensors(
        resume_refused, run_dir, stage1, lambda t: t.update({"param.0": t["param.0"][1:]})
    ) == (
        ERROR.format(run=run_dir) + f"{tensor_file}: shard 0 would not restore it: tensor "
        "'param.0' is torch.float32 [34185]; its slice, float32[0:34186], is torch.float32 [34186]"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_click_model_run_is_refused_tables_of_another_width_or_an_edited_chunk(
    tmp_path, resume_refused
):
    run_dir = tmp_path / "run"
    _train(
        *("--model", "dlrm", "--dataset", "synthetic-ctr", "--table-size", "2000"),
        *("--workers", "1", "--shards", "2", "--batch-size", "64", "--steps", "3"),
        *("--out", str(run_dir)),
    )

    assert _refused_setting(resume_refused, run_dir, "model.embedding_dim", 8) == (
        ERROR.format(run=run_dir) + f"{run_dir / 'checkpoints' / 'rows-shard0.json'} holds "
        "another model's tables than 'dlrm' (its config.json's): table 'tables.0' holds rows "
        "of 16 values, the model's of 8"
    )

    # Rows of another row optimizer: refused before anything starts, not by a shard once
    # started (exit 1, the run's summary.json then failed).
    assert _refused_setting(resume_refused, run_dir, "embeddings.row_optimizer", "adam") == (
        ERROR.format(run=run_dir) + f"{run_dir / 'checkpoints' / 'rows-shard0.json'}: shard 0 "
        "would not restore it: table 'tables.0' holds the rows of --row-optimizer sgd, the "
        "job's (its config.json's) is adam"
    )

    # Tables of another number of rows (a MovieLens file that gained a larger id sizes them
    # anew): refused before anything starts, not by a worker once started.
    assert _refused_setting(resume_refused, run_dir, "data.table_size", 3000) == (
        ERROR.format(run=run_dir) + f"{run_dir / 'checkpoints' / 'rows-shard0.json'}: table "
        "'tables.0' was made for 2000 rows, the job's is of 3000 (sized by --table-size, in "
        "its config.json): resume with the data and settings the run trained on"
    )

    # A row chunk edited and given matching digests: its header tells, before anything starts.
    chunk, _, line = _refused_row_chunk(
        resume_refused, run_dir, lambda t: t.update({"vals": t.pop("values")})
    )
    said = ERROR.format(run=run_dir) + f"{chunk}: shard 0 would not restore it: table 'tables.0': "
    assert line == said + "tensor 'values' is missing"
    chunk, num_rows, line = _refused_row_chunk(
        resume_refused, run_dir, lambda t: t.update({"ids": t["ids"].int()})
    )
    assert line == said + f"tensor 'ids' is int32 [{num_rows}], not int64 [{num_rows}]"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sandblaster_run_is_refused_another_model_or_an_edited_vector(tmp_path, resume_refused):
    run_dir = tmp_path / "run"
    _train(
        *("--algorithm", "sandblaster", "--dataset", "digits", "--model", "mlp"),
        *("--workers", "1", "--shards", "2", "--portions", "2", "--max-iterations", "2"),
        *("--out", str(run_dir)),
    )
    committed = run_dir / "checkpoints" / "lbfgs-000002"

    assert _refused_setting(resume_refused, run_dir, "model.name", "lenet") == (
        ERROR.format(run=run_dir) + f"{committed / 'shard0.json'} holds another model's "
        "parameters than 'lenet' (its config.json's): tensor 'features.0.weight' "
        "[6, 1, 5, 5] float32 does not match the shards' 'layers.1.weight' [256, 1024] float32"
    )

    [tensor_file] = committed.glob("shard0-v*.safetensors")
    double = _refused_tensors(
        resume_refused, run_dir, committed, lambda t: t.update({"d.0": t["d.0"].double()})
    )
    assert double == (
        ERROR.format(run=run_dir) + f"{tensor_file}: shard 0 would not restore it: tensor "
        "'d.0' is torch.float64 [148293]; its slice, float32[0:148293], is torch.float32 [148293]"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_downpour_run_is_refused_a_tensor_file_edited_and_resealed(tmp_path, resume_refused):
    """Its digests match: what the tensor file's header lists is what a shard would refuse."""
    run_dir = tmp_path / "run"
    _train(
        *("--model", "mlp", "--server-optimizer", "adam", "--workers", "1", "--shards", "2"),
        *("--steps", "3", "--no-eval", "--out", str(run_dir)),
    )
    checkpoints = run_dir / "checkpoints"
    [tensor_file] = checkpoints.glob("shard0-v*.safetensors")
    said = ERROR.format(run=run_dir) + f"{tensor_file}: shard 0 would not restore it: "

    def renamed(tensors: dict) -> None:
        tensors["param.1"] = tensors.pop("param.0")

    assert (
        _refused_tensors(resume_refused, run_dir, checkpoints, renamed)
        == said + "tensor 'param.0' is missing"
    )

    def state_lost(tensors: dict) -> None:
        del tensors["optim.0.exp_avg_sq"]

    assert _refused_tensors(resume_refused, run_dir, checkpoints, state_lost) == (
        said + "tensor 'optim.0.exp_avg_sq' is missing"
    )
    resumed = run_cli("train", "--resume", str(run_dir), timeout_s=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
