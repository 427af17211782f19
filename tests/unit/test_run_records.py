"""Unit tests of distbelief.launch.run_records: a job that did not end "done" still leaves its
summary, its staleness so far and the plots of its metrics so far; drawing never changes how
it ended."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from distbelief import plots
from distbelief.errors import ChildFailedError, LauncherInterrupted
from distbelief.launch.run_records import draw_plots, write_run_records
from distbelief.launch.summary import RunResult
from distbelief.telemetry import MetricsWriter, has_records, make_record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_vs_time.png", "loss_vs_time.png", "throughput_vs_time.png", "staleness.png")
STALENESS = {"shard0": {"0": 3, "1": 5}, "shard1": {"0": 4, "2": 1}}


def _metrics(run_dir: Path, steps: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for step in range(1, steps + 1):
            writer.write(
                make_record(
                    "worker", 0, time_s=0.1 * step, step=step, loss=1.0 / step, accuracy=0.5
                )
            )


def _interrupted(run_dir: Path) -> RunResult:
    return RunResult(run_dir, worker_steps={0: 10}, staleness=STALENESS)


def test_an_interrupted_run_gets_its_summary_staleness_and_plots(tmp_path: Path) -> None:
    _metrics(tmp_path, steps=10)
    write_run_records(_interrupted(tmp_path), "interrupted", "stopped by Ctrl-C")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["outcome"], summary["reason"]) == ("interrupted", "stopped by Ctrl-C")
    assert json.loads((tmp_path / "staleness.json").read_text()) == STALENESS
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file


def test_a_run_stopped_before_its_first_record_gets_no_plots(tmp_path: Path, caplog) -> None:
    MetricsWriter(tmp_path / "metrics.csv").close()  # the header alone
    assert not has_records(tmp_path / "metrics.csv")
    with caplog.at_level(logging.INFO, logger="distbelief.launch.run_records"):
        write_run_records(RunResult(tmp_path), "failed", "worker0 failed")
    assert json.loads((tmp_path / "summary.json").read_text())["outcome"] == "failed"
    assert json.loads((tmp_path / "staleness.json").read_text()) == {}
    assert not list(tmp_path.glob("*.png"))
    assert "records no metrics yet" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_missing_metrics_file_has_no_records(tmp_path: Path) -> None:
    assert not has_records(tmp_path / "metrics.csv")
    assert draw_plots(tmp_path) == []


def test_a_plot_that_cannot_be_drawn_is_logged_and_the_outcome_kept(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    _metrics(tmp_path, steps=3)

    def broken(run_dir):
        raise ValueError("no room for a figure")

    monkeypatch.setattr(plots, "plot_run", broken)
    write_run_records(_interrupted(tmp_path), "interrupted", "stopped by signal SIGTERM")
    assert json.loads((tmp_path / "summary.json").read_text())["outcome"] == "interrupted"
    assert (tmp_path / "staleness.json").exists()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "ValueError: no room for a figure" in warning
    assert f"distbelief plot {tmp_path}" in warning


_STOPS = pytest.mark.parametrize(
    "stop", [KeyboardInterrupt(), LauncherInterrupted("stopped by signal SIGTERM")]
)


def _stop_while_drawing(monkeypatch, stop: BaseException) -> None:
    def stopped(run_dir):
        raise stop

    monkeypatch.setattr(plots, "plot_run", stopped)


@_STOPS
def test_a_second_stop_while_drawing_is_not_swallowed(
    tmp_path: Path, monkeypatch, caplog, stop: BaseException
) -> None:
    _metrics(tmp_path, steps=3)
    _stop_while_drawing(monkeypatch, stop)
    with pytest.raises(type(stop)):
        write_run_records(_interrupted(tmp_path), "interrupted", "stopped by Ctrl-C")
    # Written before drawing began: the run folder still says how the job ended.
    assert json.loads((tmp_path / "summary.json").read_text())["outcome"] == "interrupted"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"draw them later with: distbelief plot {tmp_path}" in warning


def test_nothing_is_written_when_no_process_started(tmp_path: Path) -> None:
    write_run_records(None, "interrupted", "stopped by Ctrl-C")
    assert not list(tmp_path.iterdir())


@_STOPS
def test_a_stop_while_drawing_a_done_jobs_plots_leaves_it_done(
    tmp_path: Path, monkeypatch, caplog, stop: BaseException
) -> None:
    # The job finished: summary.json says done, and the launcher must not say otherwise.
    _metrics(tmp_path, steps=3)
    _stop_while_drawing(monkeypatch, stop)
    write_run_records(RunResult(tmp_path, worker_steps={0: 3}))
    assert json.loads((tmp_path / "summary.json").read_text())["outcome"] == "done"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "(stopped while drawing them)" in warning
    assert f"draw them later with: distbelief plot {tmp_path}" in warning


@_STOPS
def test_a_second_stop_while_a_stop_is_recorded_keeps_the_reason_recorded(
    tmp_path: Path, monkeypatch, stop: BaseException
) -> None:
    """The job's end as the launcher records it: a second Ctrl-C while the first's records
    were written (cutting the plots short) replaced the first, and the launcher printed
    "interrupted" where summary.json says "stopped by Ctrl-C"."""
    from distbelief.launch import job

    _metrics(tmp_path, steps=3)
    _stop_while_drawing(monkeypatch, stop)
    replacement = job._record_the_end(KeyboardInterrupt(), _interrupted(tmp_path), tmp_path)
    assert isinstance(replacement, LauncherInterrupted)
    assert str(replacement) == "stopped by Ctrl-C"
    assert json.loads((tmp_path / "summary.json").read_text())["reason"] == "stopped by Ctrl-C"
    # A failed job's records cut short by a stop: the stop is the user's, and is raised.
    with pytest.raises(type(stop)):
        job._record_the_end(
            ChildFailedError("worker0", 1, "boom"), _interrupted(tmp_path), tmp_path
        )


def test_the_command_that_draws_the_plots_later_quotes_a_folder_with_a_space(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    run_dir = tmp_path / "my run"
    run_dir.mkdir()
    _metrics(run_dir, steps=3)
    _stop_while_drawing(monkeypatch, KeyboardInterrupt())
    write_run_records(RunResult(run_dir, worker_steps={0: 3}))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"draw them later with: distbelief plot '{run_dir}'" in warning
