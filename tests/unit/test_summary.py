"""Unit tests of distbelief.launch.summary and of what the launcher's router keeps for it: a
job's summary.json however the job ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distbelief.config import JobConfig
from distbelief.launch.cluster import Event, Fault, ProcessKind, ProcessSpec
from distbelief.launch.stop_records import describe_fault
from distbelief.launch.summary import RunResult, write_summary
from distbelief.launch.supervise import EventRouter, job_result
from distbelief.launch.train_report import describe_restore
from distbelief.telemetry import MetricsWriter, make_record
from distbelief.telemetry.metrics import EVALUATED


class _Records:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.messages: list[str] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def message(self, text: str, time_s: float | None = None) -> None:
        self.messages.append(text)


def test_a_failed_job_keeps_every_field_of_a_done_one(tmp_path: Path) -> None:
    done = RunResult(tmp_path, final={"version": 3}, worker_steps={0: 5}, elapsed_s=1.23456)
    write_summary(done)
    fields = json.loads((tmp_path / "summary.json").read_text())
    assert (fields["outcome"], fields["reason"]) == ("done", None)
    failed = RunResult(tmp_path, faults=[Fault("shard0", 1.0, -9, "given up")])
    write_summary(failed, "failed", "shard0 failed (exit code -9): died and was not restarted")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == set(fields)
    assert summary["outcome"] == "failed" and summary["reason"].startswith("shard0 failed")
    assert summary["faults"][0]["action"] == "given up"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("version_before", "redone", "line_ends"),
    [(30, 8, "redid 8 updates"), (22, 0, "nothing to redo")],
)
def test_a_rollback_the_coordinator_did_not_count_is_counted_from_the_versions(
    tmp_path: Path, version_before: int, redone: int, line_ends: str
) -> None:
    """A Sandblaster shard killed once the coordinator had finished: the line said "nothing
    to redo" from the shard's versions while summary.json said updates_redone null."""
    fault = Fault("shard1", 1.0, -9, "restarted", version_before=version_before)
    fault.version_restored, fault.rolled_back = 22, True
    write_summary(RunResult(tmp_path, faults=[fault]))
    [written] = json.loads((tmp_path / "summary.json").read_text())["faults"]
    assert (written["updates_redone"], written["lost_updates"]) == (redone, 0)
    assert describe_restore(fault).endswith(line_ends)


def test_a_diverged_loss_is_written_as_null_in_strict_json(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    coordinator = {"loss": nan, "last_iteration": {"loss": nan, "grad_norm": inf}}
    write_summary(RunResult(tmp_path, final={"test_loss": nan}, coordinator=coordinator))

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["final"]["test_loss"] is None
    assert summary["coordinator"] == {
        "loss": None,
        "last_iteration": {"loss": None, "grad_norm": None},
    }


def test_no_summary_when_no_process_started_and_no_unknown_outcome(tmp_path: Path) -> None:
    write_summary(None, "interrupted", "stopped by Ctrl-C")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="outcome must be one of"):
        write_summary(RunResult(tmp_path), "crashed", "?")
    assert not list(tmp_path.iterdir())


def test_a_workers_steps_are_at_least_those_of_its_pushes_the_shards_applied() -> None:
    """A worker given up after pushing step 29 had reported step 20 in its last row: its
    worker_steps said 20, below the step its fault said its next life went on from."""
    route = EventRouter(_Records())
    worker1 = ProcessSpec(ProcessKind.WORKER, 1)
    route(Event("metric", worker1, make_record("worker", 1, time_s=1.0, step=20, loss=0.5)))
    route(Event("pushed", worker1, {"rank": 1, "step": 29}))
    assert route.steps_reached(1) == {1: 29}
    route(Event("started", worker1, {"rank": 1, "time": 2.0, "step": 25}))  # a next life
    route(Event("metric", worker1, make_record("worker", 1, time_s=3.0, step=30, loss=0.5)))
    assert route.steps_reached(1) == {1: 30}


def test_a_partitioned_replicas_steps_are_at_least_those_all_its_stages_pushed() -> None:
    route = EventRouter(_Records())
    stage0 = ProcessSpec(ProcessKind.STAGE, 0, stage=0)
    stage1 = ProcessSpec(ProcessKind.STAGE, 0, stage=1)
    route(Event("metric", stage1, make_record("worker", 0, time_s=1.0, step=20, loss=0.5)))
    route(Event("pushed", stage0, {"rank": 0, "stage": 0, "step": 31}))
    assert route.steps_reached(2) == {0: 20}  # stage 1's pushes not heard of yet
    route(Event("pushed", stage1, {"rank": 0, "stage": 1, "step": 29}))
    assert route.steps_reached(2) == {0: 29}  # the least of the two


def test_router_keeps_the_last_step_of_each_worker_and_the_last_evaluation() -> None:
    route = EventRouter(_Records())
    worker1 = ProcessSpec(ProcessKind.WORKER, 1)
    evaluator = ProcessSpec(ProcessKind.EVALUATOR, 0)
    for step in (10, 20):
        route(Event("metric", worker1, make_record("worker", 1, time_s=1.0, step=step, loss=0.5)))
    evaluation = make_record("evaluator", 0, time_s=2.0, version=7, test_accuracy=0.5)
    route(Event("metric", evaluator, evaluation))
    # The whole evaluation: a partitioned model's versions, which metrics.csv has no column for,
    # are kept too (a job stopped early said none in its summary's final).
    whole = {"test_accuracy": 0.5, "test_loss": None, "version": 7, "partition_versions": [7, 8]}
    route(Event(EVALUATED, evaluator, whole))
    assert route.steps_reported == {1: 20}
    assert route.last_evaluation == {
        "test_accuracy": 0.5,
        "version": 7,
        "partition_versions": [7, 8],
    }


def test_router_counts_a_sandblaster_workers_portions_not_its_iterations() -> None:
    """The coordinator's worker rows have the iteration as their step and the portions the
    worker committed in it: a job stopped early reports portions, as a finished one does."""
    route = EventRouter(_Records())
    coordinator = ProcessSpec(ProcessKind.COORDINATOR, 0)
    for iteration, portions in ((1, 11), (2, 9), (3, 12)):
        row = make_record("worker", 0, time_s=1.0, step=iteration, portions=portions)
        route(Event("metric", coordinator, row))
    assert route.steps_reported == {0: 32}


class _ClusterStoppedEarly:
    """A cluster whose shard1 returned its result and whose shard0 did not (it was lost, or
    the job stopped first)."""

    faults: list[Fault] = []

    def __init__(self, shard1_result: dict) -> None:
        self._shard1_result = shard1_result

    def results(self, kind: ProcessKind) -> dict:
        return {1: self._shard1_result} if kind is ProcessKind.SHARD else {}


def test_a_shards_hosts_and_staleness_are_its_last_report(tmp_path: Path) -> None:
    """Its result when it returned one, else its last heartbeat: a job that ends early still
    knows which hosts each shard's workers connected from and the staleness so far."""
    route = EventRouter(_Records())
    shard0, shard1 = ProcessSpec(ProcessKind.SHARD, 0), ProcessSpec(ProcessKind.SHARD, 1)
    before = {"shard_id": 0, "version": 1, "worker_hosts": {}, "staleness": {}}
    hosts = {"worker0": "127.0.0.4", "worker1": "127.0.0.4"}
    later = {"shard_id": 0, "version": 9, "worker_hosts": hosts, "staleness": {"0": 5, "1": 4}}
    route(Event("heartbeat", shard0, before))
    route(Event("heartbeat", shard0, later))
    returned = {
        "shard_id": 1,
        "address": "tcp://127.0.0.3:7001",
        "version": 12,
        "worker_hosts": {"worker0": "127.0.0.4"},
        "staleness": {"0": 12},
    }
    route(Event("heartbeat", shard1, {**returned, "version": 3, "staleness": {"0": 3}}))
    route(Event("done", shard1, returned))
    config = JobConfig.from_fields({"cluster.num_shards": 2})
    addresses = ["tcp://127.0.0.2:7000", "tcp://127.0.0.3:7001"]
    cluster = _ClusterStoppedEarly(returned)
    result = job_result(cluster, config, tmp_path, 1.0, route, addresses)  # type: ignore[arg-type]
    assert result.shards == {
        "shard0": {"address": addresses[0], "worker_hosts": hosts},
        "shard1": {"address": addresses[1], "worker_hosts": {"worker0": "127.0.0.4"}},
    }
    assert result.staleness == {"shard0": {"0": 5, "1": 4}, "shard1": {"0": 12}}
    # A job stopped as it started: a shard that never reported is there, with no counts.
    quiet = EventRouter(_Records())
    quiet(Event("heartbeat", shard0, before))
    result = job_result(cluster, config, tmp_path, 1.0, quiet, addresses)  # type: ignore[arg-type]
    assert result.staleness == {"shard0": {}, "shard1": {}}


def test_a_resumed_runs_faults_are_on_the_time_axis_of_its_metrics(tmp_path: Path) -> None:
    """metrics.csv's rows of a resumed run continue the earlier run's clock; the faults of
    summary.json must land among them, not back at the start."""
    metrics_csv = tmp_path / "metrics.csv"
    with MetricsWriter(metrics_csv) as earlier:
        earlier.write(make_record("evaluator", 0, time_s=4.5, version=300))
    resumed = MetricsWriter(metrics_csv, append=True)
    resumed.write(make_record("evaluator", 0, time_s=1.0, version=360))
    resumed.close()
    cluster = _ClusterStoppedEarly({})
    cluster.faults = [Fault("shard1", 1.0, -9, "restarted", version_before=350)]
    result = job_result(
        cluster,  # type: ignore[arg-type]
        JobConfig.from_fields({"cluster.num_shards": 2}),
        tmp_path,
        2.0,
        EventRouter(_Records()),
        [],
        time_offset_s=resumed.time_offset_s,
    )
    last_row_s = float(metrics_csv.read_text().splitlines()[-1].split(",")[0])
    assert last_row_s == 5.5
    assert [fault.time_s for fault in result.faults] == [5.5]
    assert cluster.faults[0].time_s == 1.0  # the cluster's own keep this launch's clock


def test_a_shards_death_line_says_the_updates_it_had_applied_when_any_were_seen() -> None:
    fault = Fault("shard1", 3.0, -9, "restarted", version_before=120)
    assert describe_fault(fault) == (
        "shard1 died (exit code -9); restarted; it had applied at least 120 updates"
    )
    for nothing_seen in (0, None):
        fault = Fault("shard1", 3.0, -9, "restarted", version_before=nothing_seen)
        assert describe_fault(fault) == "shard1 died (exit code -9); restarted"


def test_only_a_sandblaster_runs_summary_has_a_coordinator() -> None:
    """A Downpour run, which has none, was given {"stop_reason": "stopped"} as its
    coordinator once a Sandblaster run stopped before its first iteration said so."""
    from distbelief.launch.supervise import _coordinator

    class _NoResults:
        def results(self, kind: ProcessKind) -> dict:
            return {}

    route = EventRouter(_Records())
    assert _coordinator(_NoResults(), route, JobConfig()) == {}
    sandblaster = JobConfig.from_fields({"optimizer.algorithm": "sandblaster"})
    assert _coordinator(_NoResults(), route, sandblaster) == {"stop_reason": "stopped"}


def test_a_restarted_sandblaster_workers_count_adds_its_earlier_lives_portions() -> None:
    """A Sandblaster worker's life counts its portions from 0: a worker restarted after 23
    committed portions said 'finished after 14 portions' and summary.json 14."""
    records = _Records()
    route = EventRouter(records)
    coordinator, worker0 = (
        ProcessSpec(ProcessKind.COORDINATOR, 0),
        ProcessSpec(ProcessKind.WORKER, 0),
    )
    route(Event("started", worker0, {"rank": 0, "time": 1.0}))
    for iteration, portions in ((1, 11), (2, 12)):
        row = make_record("worker", 0, time_s=1.0, step=iteration, portions=portions)
        route(Event("metric", coordinator, row))
    route(Event("started", worker0, {"rank": 0, "time": 2.0}))  # its next life
    route(Event("metric", coordinator, make_record("worker", 0, time_s=3.0, step=3, portions=13)))
    result = {"rank": 0, "portions": 14, "accepted": 13, "steps": 14}
    assert route.steps_in_all_lives(0, result) == 23 + 14
    route(Event("done", worker0, result))
    assert "worker0 finished after 37 portions" in records.messages
    # Never below what its rows committed (a life's rows may come after it started).
    assert route.steps_in_all_lives(0, {**result, "steps": 1}) == 36
