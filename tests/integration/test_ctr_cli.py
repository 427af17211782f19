"""``distbelief train --model dlrm`` on a click log, as users run it: AUC in the records and the
plots, row counts per shard, a worker and then a shard SIGKILLed mid-run, a run resumed on
another number of shards, and rows resharded onto fewer shards held to --max-rows-per-shard
once restored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distbelief.client.rows import RowClient
from distbelief.server.checkpoint_meta import read_rows_meta
from distbelief.server.row_checkpoint import load_row_tables
from distbelief.telemetry import read_metrics
from tests.conftest import CHILD_ENV, CLI, run_forked, run_main, start_shard, stop_processes

CLICK_JOB = [
    *("--model", "dlrm", "--dataset", "synthetic-ctr", "--table-size", "2000"),
    *("--workers", "2", "--batch-size", "128", "--row-optimizer", "adagrad"),
    *("--row-lr", "0.05", "--lr", "0.05", "--eval-every", "1"),
]


CHECKPOINTS = ("--checkpoint-every", "1", "--out")


def _worker_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return 0
    steps: dict[int, int] = {}
    for record in read_metrics(path):
        if record["role"] == "worker":
            steps[record["rank"]] = max(steps.get(record["rank"], 0), record["step"])
    return min(steps.values()) if len(steps) == 2 else 0


def _row_checkpoint_version(run_dir: Path) -> int:
    """The version of shard 0's last row checkpoint (-1 before its first)."""
    meta = read_rows_meta(run_dir / "checkpoints", 0)
    return -1 if meta is None else meta["version"]


def _rows_on_shards(checkpoints: Path, num_shards: int) -> dict[str, int]:
    rows: dict[str, int] = {}
    for shard_id in range(num_shards):
        saved = load_row_tables(checkpoints, shard_id)
        assert saved is not None and saved.num_shards == num_shards
        for name, table in saved.tables.items():
            rows[name] = rows.get(name, 0) + table["ids"].numel()
    return rows


def _pid(run_dir: Path, name: str) -> int:
    return json.loads((run_dir / "pids.json").read_text())[name]


def _kill(run_dir: Path, name: str) -> None:
    os.kill(_pid(run_dir, name), signal.SIGKILL)


def _table_steps(checkpoints: Path, shard_id: int) -> set[int]:
    """The pushes each table of shard ``shard_id``'s last row checkpoint took (every push
    steps every table on every shard), as a set."""
    saved = load_row_tables(checkpoints, shard_id)
    assert saved is not None
    return {table["num_steps"] for table in saved.tables.values()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_click_model_trains_and_survives_a_killed_shard_and_worker(tmp_path):
    """Worker 1 killed, then shard 0: the job ends well, and worker 1's next life goes on
    after the last step whose dense and row pushes every shard applied, so shard 1 (alive
    throughout) took each step's rows from each worker once: 2 x 120 pushes of every table."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [*CLI, "train", *CLICK_JOB, "--shards", "2", "--steps", "120", *CHECKPOINTS, str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        deadline = time.monotonic() + 180
        while _worker_steps(run_dir) < 30 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _worker_steps(run_dir) >= 30, "the workers did not train"
        dead = _pid(run_dir, "worker1")
        _kill(run_dir, "worker1")  # mid-step: pushes of rows and of dense layers in flight
        while _pid(run_dir, "worker1") == dead and time.monotonic() < deadline:
            time.sleep(0.1)
        # A row checkpoint of shard 0 since (one a second, with --checkpoint-every 1).
        saved = _row_checkpoint_version(run_dir)
        while _row_checkpoint_version(run_dir) <= saved and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _row_checkpoint_version(run_dir) > saved, "shard 0 saved no row checkpoint"
        _kill(run_dir, "shard0")
        out, err = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    faults = [(f["process"], f["action"]) for f in summary["faults"]]
    assert faults == [("worker1", "restarted"), ("shard0", "restarted")]
    assert summary["worker_steps"] == {"0": 120, "1": 120}
    assert _table_steps(run_dir / "checkpoints", 1) == {2 * 120}
    assert summary["final"]["test_auc"] > 0.55
    assert "test AUC" in out
    records = read_metrics(run_dir / "metrics.csv")
    assert any(r["role"] == "worker" and r["auc"] is not None for r in records)
    assert any(r["role"] == "worker" and r["rows_pulled"] for r in records)
    shard_rows = [r["rows"] for r in records if r["role"] == "shard" and r["rows"] is not None]
    assert shard_rows and max(shard_rows) > 0
    assert (run_dir / "auc_vs_time.png").stat().st_size > 0
    # Every table's rows were saved (26 tables, each with rows on both shards).
    assert len(_rows_on_shards(run_dir / "checkpoints", 2)) == 26


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_on_another_number_of_shards_keeps_every_row(tmp_path):
    run_dir = tmp_path / "run"
    first = run_forked(
        "train", *CLICK_JOB, "--shards", "2", "--steps", "10", "--no-plots", "--out", str(run_dir)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    rows_before = _rows_on_shards(run_dir / "checkpoints", 2)
    again = run_forked("train", "--resume", str(run_dir), "--shards", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 -> 3 shards" in again.stdout
    rows_after = _rows_on_shards(run_dir / "checkpoints", 3)
    # Rows are only ever added here (no eviction), so every row survived the move.
    assert rows_after.keys() == rows_before.keys()
    assert all(rows_after[name] >= rows_before[name] for name in rows_before)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["version"] == 40  # 2 x 10 dense pushes before, 2 x 10 after
    config = json.loads((run_dir / "config.json").read_text())
    assert config["cluster"]["num_shards"] == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rows_resharded_onto_fewer_shards_are_held_to_the_bound_as_soon_as_restored(tmp_path):
    # 3 shards of at most 40 rows (and 40 ids awaiting admission) per table, moved onto 1.
    run_dir, max_rows = tmp_path / "run", 40
    rows_flags = ["--row-optimizer", "adagrad", "--admit-after", "2"]
    rows_flags += ["--max-rows-per-shard", str(max_rows)]
    job = [*("--model", "dlrm", "--dataset", "synthetic-ctr", "--table-size", "2000"), *rows_flags]
    job += ["--tables", "tables.0,tables.1", "--workers", "1", "--batch-size", "128"]
    first = run_forked(
        "train", *job, "--shards", "3", "--steps", "8", "--no-plots", "--out", str(run_dir)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    moved = run_forked("reshard", str(run_dir), "--shards", "1")
    assert moved.returncode == 0, moved.stderr[-3000:]
    saved = load_row_tables(run_dir / "checkpoints", 0)
    assert saved is not None
    assert all(t["ids"].numel() > max_rows for t in saved.tables.values())  # over the bound
    assert all(t["pending_ids"].numel() > max_rows for t in saved.tables.values())
    checkpoints = ["--checkpoint-dir", str(run_dir / "checkpoints")]
    shard, address = start_shard(0, 1, *checkpoints, *rows_flags)
    client = RowClient([address], {name: 16 for name in saved.tables}, timeout_s=30)
    try:
        [described] = client.handshake()  # declares nothing new: the restored tables' counts
    finally:
        client.close(wait=False)
        stop_processes([shard])
    for name, table in saved.tables.items():
        counts = described["tables"][name]
        assert counts["rows"] == max_rows and counts["pending"] == max_rows, name
        forgotten = table["ids"].numel() - max_rows
        assert counts["evicted"] == int(table["num_evicted"]) + forgotten, name


def test_click_flags_are_checked_before_anything_starts(tmp_path, capsys):
    wrong_data = run_main("train", "--model", "dlrm", "--out", str(tmp_path / "a"), capsys=capsys)
    assert wrong_data.returncode == 2
    wanted = "argument --dataset: data set 'digits' does not go with model 'dlrm'"
    assert wanted in wrong_data.stderr
    wrong_model = run_main(
        "train", "--dataset", "criteo", "--out", str(tmp_path / "b"), capsys=capsys
    )
    assert wrong_model.returncode == 2 and "use model dlrm" in wrong_model.stderr
    table_size = run_main(
        "train", "--table-size", "10", "--out", str(tmp_path / "c"), capsys=capsys
    )
    assert table_size.returncode == 2
    assert "argument --table-size: applies to synthetic-ctr and criteo" in table_size.stderr
    assert not any((tmp_path / name).exists() for name in "abc")
