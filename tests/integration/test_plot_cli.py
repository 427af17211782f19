"""``distbelief plot`` and the run folder's TensorBoard events, on run folders made by real
short ``distbelief train`` jobs (one with the live evaluator, one with ``--no-eval``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distbelief.telemetry import read_metrics
from tests.conftest import run_cli, run_forked, run_main

# One test process for the module: its runs are made once, not once per process.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400), pytest.mark.xdist_group("plot_cli")]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Session scope: a test process may run other modules' tests between these, which would end
# a module-scoped fixture and make the runs again.
@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two short runs: 2 workers with live evaluation, and 1 adagrad worker with --no-eval."""
    root = tmp_path_factory.mktemp("runs")
    live, once = root / "live", root / "once"
    for out, extra in (
        (live, []),
        (once, ["--workers", "1", "--server-optimizer", "adagrad", "--no-eval"]),
    ):
        result = run_forked("train", "--steps", "20", "--out", str(out), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    return live, once


def _assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, path


def test_plot_one_run(runs, tmp_path) -> None:
    live, _ = runs
    result = run_cli("plot", str(live), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    names = [Path(line).name for line in result.stdout.split()]
    assert names == [
        "accuracy_vs_time.png",
        "loss_vs_time.png",
        "throughput_vs_time.png",
        "staleness.png",
    ]
    _assert_pngs([tmp_path / name for name in names])


def test_plot_compares_two_runs(runs, tmp_path) -> None:
    live, once = runs
    out = tmp_path / "compare"
    result = run_cli("plot", str(live), str(once), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    written = [Path(line) for line in result.stdout.split()]
    assert len(written) == 4 and all(path.parent == out for path in written)
    _assert_pngs(written)


def test_plot_of_a_folder_that_is_not_a_run_exits_2(runs, tmp_path, capsys) -> None:
    live, _ = runs
    folder = tmp_path / "holiday_photos"
    folder.mkdir()
    for args in (["plot", str(folder)], ["plot", str(live), str(folder)]):
        result = run_main(*args, capsys=capsys)
        assert result.returncode == 2
        assert f"not a run folder: {folder}" in result.stderr


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_plot_into_a_folder_that_cannot_be_made_is_one_line(runs, capsys) -> None:
    live, once = runs
    # /proc looks writable to the checks but takes no new folder.
    for args in ([str(live)], [str(live), str(once)]):
        result = run_main("plot", *args, "--out", "/proc/distbelief-plots", capsys=capsys)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("distbelief plot: error: --out /proc/distbelief-plots: "), last


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_plot_into_a_folder_that_takes_no_file_names_the_flag_not_a_temporary_file(
    runs, capsys
) -> None:
    live, _ = runs
    # A folder that exists but takes no new file (to root too, which the checks let through).
    result = run_main("plot", str(live), "--out", "/proc/self", capsys=capsys)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("distbelief plot: error: --out /proc/self: "), last
    assert ".tmp" not in last, last


def test_no_eval_run_still_reports_the_final_accuracy(runs) -> None:
    _, once = runs
    summary = json.loads((once / "summary.json").read_text())
    assert 0.0 <= summary["final"]["test_accuracy"] <= 1.0
    assert summary["final"]["version"] == 20
    evaluations = [r for r in read_metrics(once / "metrics.csv") if r["role"] == "evaluator"]
    assert len(evaluations) == 1


def test_run_folder_has_tensorboard_scalars(runs) -> None:
    live, _ = runs
    accumulator = EventAccumulator(str(live / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"worker/0/loss", "worker/1/accuracy", "ps/test_accuracy", "ps/test_loss"} <= tags
    assert [event.step for event in accumulator.Scalars("worker/0/loss")] == [10, 20]
