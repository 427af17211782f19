"""``distbelief train --resume``: a run folder with the flat config.json of older runs still
resumes, and a corrupt checkpoint is refused in one line before any process starts."""

import json
import re
import shutil
from pathlib import Path

import pytest

from distbelief.config import FLAT_FIELDS
from distbelief.telemetry.metrics import read_metrics
from tests.conftest import run_forked, run_main


# Session scope, its tests in one test process (xdist_group "mlp_run"): a test process may run
# other modules' tests between them, which would end a module-scoped fixture.
@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory) -> Path:
    """A finished 3-step run of the MLP without live evaluation, which each test that refuses
    a resume of it copies: the refusals need a run to refuse, not one each."""
    run_dir = tmp_path_factory.mktemp("mlp_run") / "run"
    first = run_forked(
        "train", "--model", "mlp", "--steps", "3", "--no-eval", "--no-plots", "--out", str(run_dir)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(400)  # two short training runs, on a machine others may be loading
def test_resume_reads_a_flat_config_and_refuses_a_corrupt_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # Plots drawn: an older run's flat config.json has no such setting (it reads as drawn).
    first = run_forked("train", "--steps", "5", "--out", str(run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    sectioned = json.loads((run_dir / "config.json").read_text())
    flat = {
        old: sectioned[new.split(".")[0]][new.split(".")[1]] for old, new in FLAT_FIELDS.items()
    }
    (run_dir / "config.json").write_text(json.dumps(flat))

    again = run_forked("train", "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text()) == sectioned
    assert json.loads((run_dir / "summary.json").read_text())["final"]["version"] == 20

    tensor_file = next((run_dir / "checkpoints").glob("shard1-v*.safetensors"))
    tensor_file.write_bytes(tensor_file.read_bytes()[:-7])
    refused = run_main("train", "--resume", str(run_dir), capsys=capsys)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"distbelief train: error: --resume {run_dir}: cannot resume: ")
    assert tensor_file.name in lines[0] and "corrupt" in lines[0]
    verbose = run_main("--verbose", "train", "--resume", str(run_dir), capsys=capsys)
    assert verbose.returncode == 2
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == lines[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.xdist_group("mlp_run")
def test_resume_refuses_checkpoints_of_another_model_before_changing_the_run(
    tmp_path, mlp_run, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(mlp_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["name"] = "lenet"  # edited by hand: the checkpoints hold the MLP's
    (run_dir / "config.json").write_text(json.dumps(config))
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    refused = run_main("train", "--resume", str(run_dir), capsys=capsys)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert lines == [
        f"distbelief train: error: --resume {run_dir}: cannot resume: "
        f"{run_dir / 'checkpoints' / 'shard0.json'} holds another model's parameters than "
        "'lenet' (its config.json's): tensor 'features.0.weight' [6, 1, 5, 5] float32 does not "
        "match the shards' 'layers.1.weight' [256, 1024] float32"
    ], refused.stderr
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.xdist_group("mlp_run")
def test_a_refused_flag_beside_shards_leaves_the_run_unresharded(tmp_path, mlp_run, capsys):
    # --shards reshards the run before it resumes: a flag refused with it must be refused
    # before that, not after the checkpoints were rewritten for the new number of shards.
    run_dir = tmp_path / "run"
    shutil.copytree(mlp_run, run_dir)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    refusals = {
        ("--checkpoint-every", "0"): "argument --checkpoint-every: must be a finite number > 0",
        # The --no-eval is the run's, not typed: where it comes from, and how to undo it.
        ("--eval-every", "2"): (
            "argument --eval-every: not used with --no-eval (nothing is evaluated while the "
            f"workers train); as {run_dir / 'config.json'} has it (--eval turns it back on)"
        ),
        ("--max-iterations", "20"): "argument --max-iterations: only applies to algorithm sand",
    }
    for flag, message in refusals.items():
        refused = run_main("train", "--resume", str(run_dir), "--shards", "3", *flag, capsys=capsys)
        assert refused.returncode == 2, refused.stderr[-3000:]
        [line] = refused.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"distbelief train: error: {message}"), refused.stderr
        assert "resharded" not in refused.stdout
        assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.xdist_group("mlp_run")
@pytest.mark.parametrize(
    ("metrics", "problem"),
    [(b"a,b\n1,2\n", "cannot append, its header"), (b"\xff\xfe\n", "not a UTF-8")],
)
def test_a_resume_whose_metrics_cannot_be_appended_to_changes_nothing(
    tmp_path, mlp_run, capsys, metrics, problem
):
    """A metrics.csv of another header (or no text) is refused before config.json is
    rewritten with the resumed run's settings."""
    run_dir = tmp_path / "run"
    shutil.copytree(mlp_run, run_dir)
    (run_dir / "metrics.csv").write_bytes(metrics)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    refused = run_main("train", "--resume", str(run_dir), capsys=capsys)
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"distbelief train: error: {run_dir / 'metrics.csv'}: "), line
    assert problem in line, line
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_resumed_run_says_where_it_goes_on_from(tmp_path):
    """``--resume`` says, before training, the version each shard restored from its last
    checkpoint: an operator sees the run went on, and from where, not from scratch."""
    run_dir = tmp_path / "run"
    first = run_forked(
        "train", "--model", "mlp", "--steps", "5", "--no-plots", "--out", str(run_dir)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "from its last checkpoints" not in first.stderr
    versions = [
        json.loads((run_dir / "checkpoints" / f"shard{i}.json").read_text())["version"]
        for i in range(2)
    ]
    # The lines' t= is metrics.csv's time axis, which the resumed run's rows go on along.
    ended_s = max(float(row["time_s"]) for row in read_metrics(run_dir / "metrics.csv"))
    again = run_forked("train", "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    said = [line for line in again.stderr.splitlines() if "last checkpoints" in line]
    assert said == [
        f'message t={ended_s:.1f}s text="resumed {run_dir} from its last checkpoints: '
        f'shard0 version {versions[0]}, shard1 version {versions[1]}"'
    ], again.stderr[-3000:]
    times = [float(t) for t in re.findall(r"^\w+ t=([0-9.]+)s ", again.stderr, re.MULTILINE)]
    assert len(times) > 2 and min(times) >= round(ended_s, 1), again.stderr[-3000:]
    assert versions == [10, 10]
