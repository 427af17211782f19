"""Unit tests of the one reporting interface (distbelief.telemetry.Sink): the CSV, TensorBoard
and the progress display are sinks, and FanOut hands every record and message to each."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from distbelief.telemetry import (
    FanOut,
    MetricsWriter,
    ProgressDisplay,
    Sink,
    TensorBoardLog,
    make_record,
    read_metrics,
)


class ListSink:
    """A Sink that keeps what it is given, to see what FanOut hands on."""

    def __init__(self, fail_on_close: bool = False) -> None:
        self.records: list[dict] = []
        self.messages: list[str] = []
        self.closed = False
        self.fail_on_close = fail_on_close

    def write(self, record: dict) -> None:
        self.records.append(record)

    def message(self, text: str, time_s: float | None = None) -> None:
        self.messages.append(text)

    def close(self) -> None:
        self.closed = True
        if self.fail_on_close:
            raise OSError("disk full")


def test_the_run_reports_are_sinks(tmp_path: Path) -> None:
    display = ProgressDisplay(total_steps=1, num_workers=1, interactive=False, stream=io.StringIO())
    with MetricsWriter(tmp_path / "metrics.csv") as writer:
        for sink in (writer, TensorBoardLog(tmp_path), display, FanOut([]), ListSink()):
            assert isinstance(sink, Sink), type(sink).__name__


def test_fan_out_hands_every_record_and_message_to_each_sink(tmp_path: Path) -> None:
    stream = io.StringIO()
    kept = ListSink()
    record = make_record("worker", 0, time_s=1.0, step=10, loss=0.5)
    with FanOut(
        [
            MetricsWriter(tmp_path / "metrics.csv"),
            ProgressDisplay(total_steps=10, num_workers=1, interactive=False, stream=stream),
            kept,
        ]
    ) as sink:
        sink.write(record)
        sink.message("worker0 finished after 10 steps")
    assert read_metrics(tmp_path / "metrics.csv") == [record]
    assert kept.records == [record] and kept.messages == ["worker0 finished after 10 steps"]
    assert 'text="worker0 finished after 10 steps"' in stream.getvalue()
    assert kept.closed


def test_fan_out_closes_every_sink_when_one_fails() -> None:
    first, failing, last = ListSink(), ListSink(fail_on_close=True), ListSink()
    with pytest.raises(OSError, match="disk full"):
        FanOut([first, failing, last]).close()
    assert first.closed and failing.closed and last.closed


def test_a_closed_tensorboard_log_refuses_records(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path)
    log.close()
    assert (tmp_path / "tensorboard").is_dir()
    with pytest.raises(ValueError, match="closed"):
        log.write(make_record("worker", 0, time_s=1.0, step=1, loss=1.0))
