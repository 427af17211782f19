"""Unit tests of distbelief.telemetry.metrics: records, CSV round trip, and bad input."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from distbelief.telemetry import (
    METRIC_FIELDS,
    MetricsWriter,
    has_records,
    make_record,
    read_metrics,
)
from distbelief.telemetry.metrics import check_appendable
from tests.conftest import run_main


def _records() -> list[dict[str, object]]:
    return [
        make_record("worker", 0, time_s=0.25, step=1, loss=2.302585, accuracy=0.125),
        make_record("worker", 1, time_s=0.5, step=1, loss=2.25, accuracy=0.1),
        make_record("evaluator", 0, time_s=1.0, version=7, test_loss=1.5, test_accuracy=0.625),
        make_record("shard", 1, time_s=1.25, version=8),
        make_record(
            "shard", 0, time_s=1.5, version=9, pushes_per_s=12.5, bytes_per_s=4096.0, staleness=1.0
        ),
    ]


def test_make_record_has_every_field_in_order() -> None:
    record = make_record("worker", 2, time_s=3, step=10, loss=0.5)
    assert tuple(record) == METRIC_FIELDS
    assert record["time_s"] == 3.0 and isinstance(record["time_s"], float)
    assert record["step"] == 10 and isinstance(record["step"], int)
    assert record["accuracy"] is None and record["version"] is None


def test_round_trip_parses_numbers(tmp_path) -> None:
    path = tmp_path / "run" / "metrics.csv"
    records = _records()
    with MetricsWriter(path) as writer:
        for record in records:
            writer.write(record)
    assert read_metrics(path) == records
    back = read_metrics(path)
    assert isinstance(back[0]["rank"], int) and isinstance(back[0]["loss"], float)
    assert back[2]["loss"] is None and back[2]["version"] == 7


def test_each_write_reaches_the_file_before_close(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    writer = MetricsWriter(path)
    writer.write(make_record("worker", 0, time_s=0.1, step=1, loss=float("nan")))
    # Read while the writer is still open: what a crash right now would leave behind.
    rows = read_metrics(path)
    writer.close()
    assert len(rows) == 1 and math.isnan(rows[0]["loss"])


def test_unknown_field_is_named() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        make_record("worker", 0, time_s=0.0, learning_rate=0.1)


def test_unknown_role_is_named() -> None:
    with pytest.raises(ValueError, match="supervisor"):
        make_record("supervisor", 0, time_s=0.0)


@pytest.mark.parametrize("bad", [{"step": 1.5}, {"loss": "low"}, {"accuracy": True}])
def test_bad_value_names_the_field(bad: dict[str, object]) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        make_record("worker", 0, time_s=0.0, **bad)


def test_negative_rank_is_rejected() -> None:
    with pytest.raises(ValueError, match="rank"):
        make_record("worker", -1, time_s=0.0)


def test_writer_rejects_unknown_field(tmp_path) -> None:
    with MetricsWriter(tmp_path / "metrics.csv") as writer, pytest.raises(ValueError, match="lr"):
        writer.write({"time_s": 0.0, "role": "worker", "rank": 0, "lr": 0.1})


def test_wrong_header_names_the_file(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("time,role,rank\n1.0,worker,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.csv"):
        read_metrics(path)


def test_missing_file_names_the_file(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"nowhere\.csv"):
        read_metrics(tmp_path / "nowhere.csv")


def test_bytes_that_are_not_utf8_name_the_file(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_bytes(",".join(METRIC_FIELDS).encode() + b"\n\xff\xfe,worker\n")
    with pytest.raises(ValueError, match=r"metrics\.csv: not a UTF-8 text file"):
        read_metrics(path)


def test_plot_of_a_metrics_file_that_is_not_utf8_names_the_file(tmp_path, capsys) -> None:
    """The check for records before plotting reads no text: ``read_metrics`` names the file."""
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"\x89PNG\r\n" + bytes(range(128, 256)))
    assert has_records(path)
    result = run_main("plot", str(tmp_path), capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"distbelief plot: error: {path}: not a UTF-8 text file (byte 0: invalid start byte)"
    ]


def test_bad_cell_names_file_line_and_column(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    row = ["0.5", "worker", "0", "x"] + [""] * (len(METRIC_FIELDS) - 4)
    path.write_text(",".join(METRIC_FIELDS) + "\n" + ",".join(row) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.csv, line 2: column 'step'.*'x'"):
        read_metrics(path)


def test_append_keeps_earlier_rows_and_writes_one_header(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    first, second, *_ = _records()
    with MetricsWriter(path) as writer:
        writer.write(first)
    with MetricsWriter(path, append=True) as writer:
        writer.write(second)
    assert read_metrics(path) == [first, {**second, "time_s": 0.25 + 0.5}]
    with MetricsWriter(tmp_path / "new.csv", append=True) as writer:  # a new file: header too
        writer.write(first)
    assert read_metrics(tmp_path / "new.csv") == [first]


def test_appended_rows_continue_the_clock_of_the_rows_before(tmp_path) -> None:
    # A resumed run's processes count time_s from their own start again: its rows must come
    # after the first run's on a plot's time axis, not among them.
    path = tmp_path / "metrics.csv"
    first_run = [make_record("worker", 0, time_s=t, step=s) for s, t in ((1, 0.5), (2, 3.0))]
    last_shard = make_record("shard", 0, time_s=2.5, version=4)  # written after, stamped before
    with MetricsWriter(path) as writer:
        for record in [*first_run, last_shard]:
            writer.write(record)
    resumed = make_record("worker", 0, time_s=0.0, step=1)
    with MetricsWriter(path, append=True) as writer:
        writer.write(resumed)
        writer.write({**resumed, "time_s": 1.5})
    times_s = [record["time_s"] for record in read_metrics(path)]
    assert times_s == [0.5, 3.0, 2.5, 3.0, 4.5]
    assert resumed["time_s"] == 0.0  # the caller's record is left as it was


def test_the_clock_of_a_large_file_is_read_from_its_last_rows(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    with MetricsWriter(path) as writer:
        for step in range(1, 3001):  # well past the tail that is read
            writer.write(make_record("worker", 0, time_s=1000.0 + step, step=step))
    with MetricsWriter(path, append=True) as writer:
        writer.write(make_record("worker", 0, time_s=1.0, step=1))
    assert read_metrics(path)[-1]["time_s"] == 4001.0


def test_append_to_a_file_of_another_layout_is_refused(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("time,role,rank\n1.0,worker,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.csv: cannot append"):
        MetricsWriter(path, append=True)
    assert path.read_text(encoding="utf-8").count("\n") == 2


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (bytes(range(128, 256)) * 8 + b"\n", "not a UTF-8 text file (byte 0: invalid start byte)"),
        (b"x" * 10_000_000, "its first line is too long for a header"),  # no newline at all
        (b"x," * 1000 + b"\n", "its header (a long line) is not"),
    ],
    ids=["binary", "one-huge-line", "a-long-line"],
)
def test_append_to_a_file_that_is_no_csv_is_refused_in_a_short_line(tmp_path, content, said):
    path = tmp_path / "metrics.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        MetricsWriter(path, append=True)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot append, ") and said in message
    assert len(message) < 2000 and message.isprintable()
    assert path.read_bytes() == content


def test_check_appendable_refuses_another_layout_and_changes_nothing(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    check_appendable(path)  # missing: a new file will do
    assert not path.exists()
    torn = ",".join(METRIC_FIELDS) + "\n0.5,worker,0,1"
    path.write_text(torn, encoding="utf-8")
    check_appendable(path)
    assert path.read_text(encoding="utf-8") == torn
    path.write_text("time,role,rank\n1.0,worker,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.csv: cannot append"):
        check_appendable(path)


def test_append_drops_a_last_line_cut_off_mid_write(tmp_path, caplog) -> None:
    path = tmp_path / "metrics.csv"
    first, second, third, *_ = _records()
    with MetricsWriter(path) as writer:
        writer.write(first)
        writer.write(second)
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])  # the writer of the second row was killed mid-row
    with MetricsWriter(path, append=True) as writer:
        writer.write(third)
    assert read_metrics(path) == [first, {**third, "time_s": 0.25 + 1.0}]
    [line] = [r.getMessage() for r in caplog.records if "dropped its last line" in r.getMessage()]
    assert str(path) in line and "worker,1" in line


def test_append_after_a_header_cut_off_mid_write_starts_the_file_again(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("time_s,role,ra", encoding="utf-8")
    first, *_ = _records()
    with MetricsWriter(path, append=True) as writer:
        writer.write(first)
    assert read_metrics(path) == [first]


def test_append_to_a_cut_off_file_of_another_layout_is_refused_unchanged(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    for text in ("time,role,rank\n1.0,wor", "step,loss"):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=r"metrics\.csv: cannot append"):
            MetricsWriter(path, append=True)
        assert path.read_text(encoding="utf-8") == text


def test_read_skips_a_last_line_cut_off_mid_write(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    first, second, *_ = _records()
    with MetricsWriter(path) as writer:
        writer.write(first)
        writer.write(second)
    path.write_bytes(path.read_bytes()[:-1])  # even a row whose cells are all there
    assert read_metrics(path) == [first]


def test_a_file_from_before_the_shard_columns_still_reads(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    old_header = METRIC_FIELDS[: METRIC_FIELDS.index("pushes_per_s")]
    row = ["0.5", "worker", "0", "10", "2.0"] + [""] * (len(old_header) - 5)
    path.write_text(",".join(old_header) + "\n" + ",".join(row) + "\n", encoding="utf-8")
    (record,) = read_metrics(path)
    assert tuple(record) == METRIC_FIELDS
    assert record["step"] == 10 and record["loss"] == 2.0 and record["pushes_per_s"] is None


@pytest.mark.parametrize("num_columns", [16, len(METRIC_FIELDS) - 1], ids=["16", "no-pending"])
def test_append_to_a_file_of_an_earlier_layout_rewrites_it_in_this_one(
    tmp_path, num_columns: int
) -> None:
    path = tmp_path / "metrics.csv"
    earlier = METRIC_FIELDS[:num_columns]
    row = ["1.5", "worker", "0", "3"] + [""] * (len(earlier) - 4)
    path.write_text(",".join(earlier) + "\n" + ",".join(row) + "\n", encoding="utf-8")
    first, *_ = _records()
    with MetricsWriter(path, append=True) as writer:
        writer.write(first)
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header == ",".join(METRIC_FIELDS)
    rows = read_metrics(path)
    assert (rows[0]["time_s"], rows[0]["step"], rows[0]["portions"]) == (1.5, 3, None)
    assert rows[1] == {**first, "time_s": 1.5 + 0.25}


def test_coordinator_records_carry_the_iteration_figures() -> None:
    record = make_record(
        "coordinator",
        0,
        time_s=2.0,
        step=4,
        loss=0.5,
        grad_norm=0.1,
        step_size=1.0,
        evaluations=2,
        portions=40,
        backups=3,
        backups_won=1,
    )
    assert (record["role"], record["evaluations"], record["backups_won"]) == ("coordinator", 2, 1)


def test_a_new_file_appears_with_its_header(tmp_path, monkeypatch) -> None:
    """A reader of a live run folder finds no metrics file or a headed one, never an empty one:
    the header is written beside it and renamed into place."""
    path = tmp_path / "metrics.csv"
    renames = []
    rename = os.replace

    def watched(source, target) -> None:
        renames.append((Path(target) == path, path.exists(), Path(source).read_text()))
        rename(source, target)

    monkeypatch.setattr(os, "replace", watched)
    with MetricsWriter(path) as writer:
        writer.write(make_record("worker", 0, time_s=1.0, step=1, loss=0.5))
    assert renames == [(True, False, ",".join(METRIC_FIELDS) + "\n")]
    assert [r["step"] for r in read_metrics(path)] == [1]
