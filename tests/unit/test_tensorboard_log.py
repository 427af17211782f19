"""Unit tests of distbelief.telemetry.tensorboard, and of the launcher's router feeding it:
records go in, event files come out, and TensorBoard's own reader finds the right scalars."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distbelief.launch.cluster import Event, ProcessKind, ProcessSpec
from distbelief.launch.supervise import EventRouter
from distbelief.telemetry import (
    TENSORBOARD_DIR,
    FanOut,
    MetricsWriter,
    ProgressDisplay,
    TensorBoardLog,
    make_record,
    read_metrics,
    scalar_tags,
)
from distbelief.telemetry.metrics import METRIC_FIELDS, ROLES

WORKER0 = ProcessSpec(ProcessKind.WORKER, 0)
EVALUATOR = ProcessSpec(ProcessKind.EVALUATOR, 0)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_scalar_tags_per_role() -> None:
    worker = make_record("worker", 1, time_s=1.0, step=20, loss=0.5, accuracy=0.75)
    assert scalar_tags(worker) == [("worker/1/loss", 0.5, 20), ("worker/1/accuracy", 0.75, 20)]
    evaluator = make_record("evaluator", 0, time_s=1.0, version=7, test_loss=1.0)
    assert scalar_tags(evaluator) == [("ps/test_loss", 1.0, 7)]
    shard = make_record("shard", 2, time_s=1.0, version=9, pushes_per_s=3.0, staleness=0.5)
    assert scalar_tags(shard) == [("shard/2/pushes_per_s", 3.0, 9), ("shard/2/staleness", 0.5, 9)]
    assert scalar_tags(make_record("shard", 0, time_s=1.0, pushes_per_s=1.0)) == []


def test_each_stage_of_a_partitioned_replica_has_its_own_staleness() -> None:
    first = make_record("worker", 0, time_s=1.0, step=5, staleness=0.2, stage=0)
    last = make_record(
        "worker", 0, time_s=1.0, step=5, loss=2.0, accuracy=0.1, staleness=0.0, stage=1
    )
    assert scalar_tags(first) == [("worker/0/stage0/staleness", 0.2, 5)]
    assert scalar_tags(last) == [
        ("worker/0/loss", 2.0, 5),
        ("worker/0/accuracy", 0.1, 5),
        ("worker/0/stage1/staleness", 0.0, 5),
    ]


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="supervisor"):
        scalar_tags({"role": "supervisor", "rank": 0, "time_s": 0.0})


def test_records_read_back_from_event_files(tmp_path: Path) -> None:
    with TensorBoardLog(tmp_path) as log:
        for step in (10, 20, 30):
            log.write(make_record("worker", 0, time_s=step / 10, step=step, loss=1.0 / step))
        log.write(make_record("evaluator", 0, time_s=3.0, version=60, test_accuracy=0.9))
    assert list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["worker/0/loss"] == [
        (10, pytest.approx(0.1)),
        (20, pytest.approx(0.05)),
        (30, pytest.approx(1 / 30)),
    ]
    assert scalars["ps/test_accuracy"] == [(60, pytest.approx(0.9))]


def test_router_sends_every_record_to_csv_display_and_tensorboard(tmp_path: Path) -> None:
    stream = io.StringIO()
    with (
        MetricsWriter(tmp_path / "metrics.csv") as writer,
        ProgressDisplay(total_steps=20, num_workers=1, interactive=False, stream=stream) as shown,
        TensorBoardLog(tmp_path) as log,
    ):
        route = EventRouter(FanOut([writer, shown, log]))
        route(Event("started", WORKER0, {"rank": 0, "time": 1000.0}))
        route(Event("metric", WORKER0, make_record("worker", 0, time_s=1001.0, step=10, loss=2.0)))
        route(Event("metric", WORKER0, make_record("worker", 0, time_s=1002.0, step=20, loss=1.0)))
        route(
            Event(
                "metric",
                EVALUATOR,
                make_record(
                    "evaluator", 0, time_s=1002.5, version=40, test_loss=0.8, test_accuracy=0.7
                ),
            )
        )
        route(Event("done", WORKER0, {"rank": 0, "steps": 20}))
        sandblasters = ProcessSpec(ProcessKind.WORKER, 1)  # a worker of a Sandblaster job
        route(Event("done", sandblasters, {"rank": 1, "steps": 7, "portions": 7}))
        route.poll_shards()  # no poller: nothing happens
    assert [r["time_s"] for r in read_metrics(tmp_path / "metrics.csv")] == [1.0, 2.0, 2.5]
    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["worker/0/loss"] == [(10, 2.0), (20, 1.0)]
    assert scalars["ps/test_loss"] == [(40, pytest.approx(0.8))]
    assert scalars["ps/test_accuracy"] == [(40, pytest.approx(0.7))]
    lines = stream.getvalue().splitlines()
    assert lines[-3] == 'message t=2.5s text="worker0 finished after 20 steps"'
    assert lines[-2] == 'message t=2.5s text="worker1 finished after 7 portions"'


class _StubPoller:
    def __init__(self, records: list[dict]) -> None:
        self.records = records

    def poll_if_due(self, *, now: bool = False) -> list[dict]:
        taken, self.records = self.records, []
        return taken


def test_router_routes_polled_shard_records(tmp_path: Path) -> None:
    stream = io.StringIO()
    shard = make_record("shard", 0, time_s=1003.0, version=50, pushes_per_s=25.0, staleness=1.5)
    with (
        MetricsWriter(tmp_path / "metrics.csv") as writer,
        ProgressDisplay(total_steps=20, num_workers=1, interactive=False, stream=stream) as display,
        TensorBoardLog(tmp_path) as log,
    ):
        route = EventRouter(FanOut([writer, display, log]), _StubPoller([shard]))
        route(Event("started", WORKER0, {"rank": 0, "time": 1000.0}))
        route.poll_shards()
        route.poll_shards()  # nothing new
    (record,) = read_metrics(tmp_path / "metrics.csv")
    assert (record["role"], record["time_s"], record["pushes_per_s"]) == ("shard", 3.0, 25.0)
    assert _scalars(tmp_path / TENSORBOARD_DIR)["shard/0/pushes_per_s"] == [(50, 25.0)]
    assert "shard0.pushes_per_s=25.0" in stream.getvalue()


def _readme_tensorboard_tags() -> set[str]:
    """The tags the README's "TensorBoard" bullet lists, ``a/{b,c}`` expanded."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    bullet = readme.split("- **TensorBoard.**", 1)[1].split("\n- **", 1)[0]
    tags = set()
    for span in re.findall(r"`([^`]+)`", " ".join(bullet.split())):
        span = span.replace(" ", "")
        head, brace, rest = span.partition("{")
        names = rest.rstrip("}").split(",") if brace else [""]
        tags.update(head + name for name in names)
    return tags


def _as_documented(tag: str) -> str:
    """``worker/0/stage1/staleness`` as the README writes it: ``worker/<rank>/stage<s>/...``."""
    tag = re.sub(r"^(worker|coordinator)/\d+/", lambda m: f"{m[1]}/<rank>/", tag)
    tag = re.sub(r"^shard/\d+/", "shard/<id>/", tag)
    return re.sub(r"/stage\d+/", "/stage<s>/", tag)


def test_the_readme_lists_every_tensorboard_tag() -> None:
    """Every scalar a run can write is one the README's TensorBoard bullet names (Sandblaster's
    coordinator and worker tags included)."""
    every = dict.fromkeys(set(METRIC_FIELDS) - {"time_s", "role", "rank", "stage"}, 1)
    records = [make_record(role, 0, time_s=1.0, **every) for role in ROLES]
    # A partitioned replica's stage (Downpour: no Sandblaster portions).
    stage = {**every, "stage": 1, "portions": None}
    records.append(make_record("worker", 0, time_s=1.0, **stage))
    written = {_as_documented(tag) for record in records for tag, _, _ in scalar_tags(record)}
    documented = {
        tag.replace("coordinator/0/", "coordinator/<rank>/") for tag in _readme_tensorboard_tags()
    }
    assert "coordinator/<rank>/grad_norm" in written
    assert written - documented == set()
