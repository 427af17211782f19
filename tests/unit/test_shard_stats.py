"""Unit tests of distbelief.telemetry.shard_stats: STATS replies become shard records with rates."""

from __future__ import annotations

import types

import pytest

from distbelief.telemetry import METRIC_FIELDS, ShardStatsPoller, shard_records


def _stats(time_s: float, version: int, pushes: int, nbytes: int, staleness: dict) -> dict:
    return {
        "shard_id": 1,
        "time": time_s,
        "version": version,
        "num_pushes": pushes,
        "bytes_received": nbytes // 2,
        "bytes_sent": nbytes - nbytes // 2,
        "staleness": staleness,
    }


def test_first_poll_has_a_version_and_no_rates() -> None:
    (record,) = shard_records([_stats(100.0, 5, 5, 1000, {"0": 5})])
    assert tuple(record) == METRIC_FIELDS
    assert (record["role"], record["rank"], record["version"]) == ("shard", 1, 5)
    assert record["time_s"] == 100.0
    assert record["pushes_per_s"] is None and record["bytes_per_s"] is None


def test_rates_and_mean_staleness_are_since_the_previous_poll() -> None:
    before = _stats(100.0, 5, 5, 1000, {"0": 5})
    now = _stats(102.0, 13, 13, 5000, {"0": 5, "1": 4, "3": 4})
    (record,) = shard_records([now], [before])
    assert record["pushes_per_s"] == pytest.approx(4.0)
    assert record["bytes_per_s"] == pytest.approx(2000.0)
    # 8 new pushes: four with staleness 1, four with staleness 3.
    assert record["staleness"] == pytest.approx(2.0)


def test_bytes_through_shared_memory_count_in_the_byte_rate() -> None:
    """On one host, pushes and pulls may move no socket byte: the rate still shows them."""
    before = {**_stats(100.0, 5, 5, 1000, {"0": 5}), "bytes_shared": 4000}
    now = {**_stats(102.0, 13, 13, 1000, {"0": 13}), "bytes_shared": 10000}
    (record,) = shard_records([now], [before])
    assert record["bytes_per_s"] == pytest.approx(3000.0)


@pytest.mark.parametrize(
    ("before_extra", "now_extra", "now_pushes", "now_bytes"),
    [
        ({}, {}, 2, 400),  # counters lower than before: they started again from 0
        ({"durable": {"life": "a"}}, {"durable": {"life": "b"}}, 9, 9000),  # another life
    ],
)
def test_a_shard_restarted_between_polls_gets_no_rates(
    before_extra: dict, now_extra: dict, now_pushes: int, now_bytes: int
) -> None:
    before = {**_stats(100.0, 5, 5, 1000, {"0": 5}), **before_extra}
    now = {**_stats(102.0, 3, now_pushes, now_bytes, {"0": now_pushes}), **now_extra}
    (record,) = shard_records([now], [before])
    assert record["version"] == 3
    assert record["pushes_per_s"] is None and record["bytes_per_s"] is None


def test_a_shard_with_tables_reports_its_rows_and_ids_awaiting_admission() -> None:
    tables = {
        "tables.0": {"rows": 5, "admitted": 9, "evicted": 4, "pending": 7},
        "tables.1": {"rows": 2, "admitted": 2, "evicted": 0, "pending": 3},
    }
    (record,) = shard_records([{**_stats(100.0, 5, 5, 1000, {"0": 5}), "rows": {"tables": tables}}])
    counts = ("rows", "rows_admitted", "rows_evicted", "rows_pending")
    assert tuple(record[key] for key in counts) == (7, 11, 4, 10)
    (plain,) = shard_records([_stats(100.0, 5, 5, 1000, {"0": 5})])
    assert all(plain[key] is None for key in counts)


def test_no_pushes_in_between_gives_no_staleness() -> None:
    before = _stats(100.0, 5, 5, 1000, {"0": 5})
    (record,) = shard_records([_stats(101.0, 5, 5, 1200, {"0": 5})], [before])
    assert record["pushes_per_s"] == 0.0 and record["staleness"] is None


@pytest.mark.parametrize("kwargs", [{"every_s": 0.0}, {"timeout_s": -1.0}])
def test_bad_arguments_are_named(kwargs: dict) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        ShardStatsPoller(["tcp://127.0.0.1:1"], **kwargs)


def test_a_last_poll_soon_after_the_one_before_has_a_version_and_no_rates(monkeypatch) -> None:
    """The launcher polls once more as training ends: ~10 ms after a periodic poll it said
    0 pushes/s and 0 MB/s, the last word of metrics.csv and of the display on every shard."""
    from distbelief.telemetry import shard_stats as shard_stats_module

    polls = iter([_stats(100.0, 5, 5, 1000, {"0": 5}), _stats(100.01, 5, 5, 1000, {"0": 5})])
    polls = iter([*polls, _stats(102.0, 13, 13, 5000, {"0": 5, "1": 8})])
    monkeypatch.setattr(shard_stats_module, "poll_shard_stats", lambda *a, **k: [next(polls)])
    clock = iter([0.0, 0.0, 0.01, 30.0])  # made, polled, polled again, and once more
    # The module's clock alone (the time module itself is every thread's).
    fake_time = types.SimpleNamespace(monotonic=lambda: next(clock))
    monkeypatch.setattr(shard_stats_module, "time", fake_time)
    poller = ShardStatsPoller(["tcp://127.0.0.1:1"], every_s=1.0)
    assert poller.poll_if_due()[0]["version"] == 5
    (last,) = poller.poll_if_due(now=True)
    assert (last["version"], last["pushes_per_s"], last["bytes_per_s"]) == (5, None, None)
    # The next has its rates over the time since the poll before the one without.
    (record,) = poller.poll_if_due(now=True)
    assert record["pushes_per_s"] == pytest.approx(4.0)
