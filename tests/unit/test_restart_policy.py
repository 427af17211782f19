"""Unit tests of the restart policy by process kind (distbelief.launch.cluster.ProcessBook): a
shard or the evaluator out of restarts fails the job, a worker is given up, and the job fails
only when every worker is; shards restart on their old address, workers after their last push
the shards applied."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from distbelief.config import JobConfig
from distbelief.coordinator.checkpoint import checkpoint_tag, commit
from distbelief.errors import ChildFailedError
from distbelief.launch.cluster import (
    CHECKPOINT_DIR,
    EXIT_PEER_LOST,
    NEIGHBOUR_LOST,
    RESTART_POLICIES,
    Event,
    Fault,
    ProcessBook,
    ProcessKind,
    ProcessSpec,
)
from distbelief.launch.stop_records import add_what_the_stop_settled, describe_fault
from distbelief.launch.summary import RunResult
from distbelief.launch.train_report import describe_restore, restore_lines

SHARD0 = ProcessSpec(ProcessKind.SHARD, 0)
SHARD1 = ProcessSpec(ProcessKind.SHARD, 1)
COORDINATOR = ProcessSpec(ProcessKind.COORDINATOR, 0)


def _sandblaster_book() -> ProcessBook:
    return ProcessBook(
        JobConfig.from_fields({"optimizer.algorithm": "sandblaster", "cluster.num_shards": 2})
    )


WORKER0 = ProcessSpec(ProcessKind.WORKER, 0)
WORKER1 = ProcessSpec(ProcessKind.WORKER, 1)
EVALUATOR = ProcessSpec(ProcessKind.EVALUATOR, 0)


def _book(max_restarts: int = 1) -> ProcessBook:
    return ProcessBook(
        JobConfig.from_fields(
            {
                "cluster.num_workers": 2,
                "cluster.num_shards": 2,
                "faults.max_restarts": max_restarts,
            }
        )
    )


def _die(book: ProcessBook, spec: ProcessSpec, *, stopping: bool = False) -> str:
    fault = book.record_death(spec, -9, stopping=stopping)
    book.raise_if_fatal(spec, fault)
    return fault.action


def test_every_kind_has_a_policy() -> None:
    assert set(RESTART_POLICIES) == set(ProcessKind)
    assert [kind for kind, p in RESTART_POLICIES.items() if not p.fatal_when_exhausted] == [
        ProcessKind.WORKER,
        ProcessKind.STAGE,
    ]
    assert [kind for kind, p in RESTART_POLICIES.items() if p.restarts_replica] == [
        ProcessKind.STAGE
    ]


@pytest.mark.parametrize("spec", [SHARD0, EVALUATOR], ids=lambda s: s.name)
def test_shard_and_evaluator_out_of_restarts_fail_the_job(spec: ProcessSpec) -> None:
    book = _book(max_restarts=1)
    assert _die(book, spec) == "restarted"
    with pytest.raises(
        ChildFailedError, match=rf"{spec.name} failed \(exit code -9\):\ndied and was not restarted"
    ):
        _die(book, spec)
    assert [fault.action for fault in book.faults] == ["restarted", "given up"]


def test_a_worker_out_of_restarts_is_given_up_and_the_job_fails_when_all_are() -> None:
    book = _book(max_restarts=1)
    assert _die(book, WORKER1) == "restarted"
    assert _die(book, WORKER1) == "given up"
    assert book.given_up == {"worker1"}
    assert _die(book, WORKER0) == "restarted"
    with pytest.raises(
        ChildFailedError, match=r"every worker failed \(exit code -9\):\nall workers died"
    ):
        _die(book, WORKER0)


def test_no_restart_while_the_job_stops() -> None:
    book = _book(max_restarts=3)
    assert _die(book, WORKER0, stopping=True) == "given up"
    with pytest.raises(ChildFailedError):
        _die(book, SHARD0, stopping=True)


def test_a_shard_dead_while_the_job_stops_says_whether_it_saved_its_last_checkpoint() -> None:
    book = _book(max_restarts=3)
    shard1 = ProcessSpec(ProcessKind.SHARD, 1)
    book.note(Event("done", shard1, {"shard_id": 1, "version": 5}))  # saved, then killed
    unsaved, saved = (book.record_death(s, -9, stopping=True) for s in (SHARD0, shard1))
    assert (unsaved.while_stopping, unsaved.last_checkpoint_saved) == (True, False)
    assert (saved.while_stopping, saved.last_checkpoint_saved) == (True, True)
    running = _book().record_death(SHARD0, -9, stopping=False)
    assert (running.while_stopping, running.last_checkpoint_saved) == (False, None)


def test_restarts_resume_where_the_process_was() -> None:
    book = _book()
    assert book.spec(ProcessKind.SHARD, 0).bind == "tcp://127.0.0.1:0"
    book.note(Event("ready", SHARD0, {"shard_id": 0, "address": "tcp://127.0.0.1:4321"}))
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 7}))
    book.note(Event("pushed", WORKER1, {"rank": 1, "step": 37}))
    book.note(Event("metric", WORKER1, {"role": "worker", "rank": 1, "step": 40, "version": 9}))
    assert book.spec(ProcessKind.SHARD, 0).bind == "tcp://127.0.0.1:4321"
    # Its last push the shards applied, not the step of its last report.
    assert book.spec(ProcessKind.WORKER, 1).resume_step == 37
    assert book.spec(ProcessKind.WORKER, 0).resume_step == 0
    fault = book.record_death(SHARD0, -9, stopping=False)
    assert fault.version_before == 9  # the worker's view bounds the shard's version
    restored = {"shard_id": 0, "address": "tcp://127.0.0.1:4321", "restored_version": 5}
    book.note(Event("ready", SHARD0, restored))
    assert (fault.version_restored, fault.lost_updates) == (5, 4)


def test_lost_updates_subtract_what_the_workers_replayed() -> None:
    book = _book()
    book.note(Event("ready", SHARD0, {"shard_id": 0, "address": "tcp://127.0.0.1:4321"}))
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 7}))
    fault = book.record_death(SHARD0, -9, stopping=False)
    restored = {"shard_id": 0, "address": "tcp://127.0.0.1:4321", "restored_version": 5}
    book.note(Event("ready", SHARD0, restored))
    recovery = {"updates_replayed": 3, "pushes_resent": 1, "version_seen_before": 9}
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 10, **recovery}))
    # A worker saw version 9 before the death: more than the last heartbeat's 7.
    assert (fault.version_before, fault.updates_replayed, fault.lost_updates) == (9, 3, 0)
    book.note(Event("done", SHARD0, {"shard_id": 0, **recovery, "version_seen_before": 10}))
    assert (fault.version_before, fault.lost_updates) == (10, 1)


def test_a_sandblaster_shard_restored_from_its_checkpoint_loses_nothing() -> None:
    # The whole job goes back to the checkpoint and redoes the iterations since it.
    book = _sandblaster_book()
    book.note(Event("ready", SHARD0, {"shard_id": 0, "address": "tcp://127.0.0.1:4321"}))
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 24}))
    fault = book.record_death(SHARD0, -9, stopping=False)
    restored = {"shard_id": 0, "address": "tcp://127.0.0.1:4321", "restored_version": 22}
    book.note(Event("ready", SHARD0, restored))
    assert (fault.rolled_back, fault.version_before, fault.lost_updates) == (True, 24, 0)
    assert describe_restore(fault) == (
        "shard0: restored version 22; the job went back to that checkpoint and redid 2 updates"
    )


def test_a_sandblaster_rollback_counts_what_the_coordinator_redid() -> None:
    # The shards' heartbeats lag (version 24 seen); the coordinator had finished iteration 27.
    book = _sandblaster_book()
    coordinator = ProcessSpec(ProcessKind.COORDINATOR, 0)
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 24}))
    shard_fault = book.record_death(SHARD0, -9, stopping=False)
    restored = {"shard_id": 0, "address": "tcp://127.0.0.1:4321", "restored_version": 22}
    book.note(Event("ready", SHARD0, restored))
    book.note(Event("rolled_back", coordinator, {"from_iteration": 27, "to_iteration": 22}))
    assert (shard_fault.updates_redone, shard_fault.lost_updates) == (5, 0)
    assert describe_restore(shard_fault) == (
        "shard0: restored version 22; the job went back to that checkpoint and redid 5 updates"
    )
    # A restarted coordinator knows not where its previous life got to: its reports tell.
    book.note(Event("metric", coordinator, {"role": "coordinator", "rank": 0, "step": 30}))
    fault = book.record_death(coordinator, -9, stopping=False)
    book.note(Event("rolled_back", coordinator, {"from_iteration": None, "to_iteration": 28}))
    assert (fault.rolled_back, fault.updates_redone, fault.lost_updates) == (True, 2, 0)
    assert shard_fault.updates_redone == 5  # counted once, for the rollback it caused
    assert describe_restore(fault) == (
        "coordinator: the job went back to its last checkpoint and redid 2 updates"
    )


def _rolled_back_from_6_to_1(*victims: ProcessSpec) -> list[Fault]:
    """The faults of ``victims``' deaths at iteration 6 of a Sandblaster job, once its
    coordinator has gone back to the checkpoint of iteration 1."""
    book = _sandblaster_book()
    book.note(Event("metric", COORDINATOR, {"role": "coordinator", "rank": 0, "step": 6}))
    faults = [book.record_death(victim, -9, stopping=False) for victim in victims]
    book.note(Event("rolled_back", COORDINATOR, {"from_iteration": None, "to_iteration": 1}))
    return faults


def test_a_coordinator_killed_again_before_it_told_its_rollback_counts_the_redone_once() -> None:
    # Killed at iteration 6 (checkpoint: 1), its next life killed before it told its rollback:
    # the third life's rollback redoes 5 iterations once, not once per death (it said 5 twice).
    first, second = _rolled_back_from_6_to_1(COORDINATOR, COORDINATOR)
    assert (first.updates_redone, second.updates_redone) == (5, 0)
    assert restore_lines([first, second])[1] == (
        "coordinator: its last checkpoint held every update: nothing to redo"
    )


def test_two_shards_lost_together_each_say_what_the_one_rollback_redid() -> None:
    faults = _rolled_back_from_6_to_1(SHARD0, SHARD1)
    assert [fault.updates_redone for fault in faults] == [5, 5]


def test_a_coordinator_killed_before_its_first_iteration_lost_and_redid_nothing() -> None:
    # Killed before its first report, it had saved no checkpoint: its next life starts afresh
    # (no "rolled_back"), and its first report says the job had done nothing to redo.
    book = _sandblaster_book()
    coordinator = ProcessSpec(ProcessKind.COORDINATOR, 0)
    fault = book.record_death(coordinator, -9, stopping=False)
    book.note(Event("metric", coordinator, {"role": "coordinator", "rank": 0, "step": 0}))
    assert (fault.rolled_back, fault.updates_redone, fault.lost_updates) == (True, 0, 0)
    assert restore_lines([fault]) == [
        "coordinator: its last checkpoint held every update: nothing to redo"
    ]


def test_a_restore_line_counts_one_update_or_push_in_the_singular() -> None:
    rolled_back = Fault("shard1", 1.0, -9, "restarted", version_before=23, version_restored=22)
    rolled_back.rolled_back, rolled_back.updates_redone = True, 1
    assert describe_restore(rolled_back) == (
        "shard1: restored version 22; the job went back to that checkpoint and redid 1 update"
    )
    coordinator = Fault("coordinator", 1.0, -9, "restarted", rolled_back=True, updates_redone=1)
    assert describe_restore(coordinator) == (
        "coordinator: the job went back to its last checkpoint and redid 1 update"
    )
    replayed = Fault("shard1", 1.0, -9, "restarted", version_before=83, version_restored=80)
    replayed.updates_replayed, replayed.pushes_resent = 1, 1  # and so 1 update lost
    assert describe_restore(replayed) == (
        "shard1: restored version 80; the workers re-sent 1 update it lacked and 1 push in "
        "flight; 1 update lost"
    )


def test_a_restored_shard_with_row_tables_says_their_updates_since_their_save_are_lost(
    tmp_path,
) -> None:
    """The workers re-send dense updates only: a shard whose checkpoints hold row tables lost
    the row updates since their last save, which its count of updates lost does not hold
    ("0 updates lost" alone would say nothing was)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "rows-shard1.json").write_text("{}")
    restored = [
        Fault("shard0", 1.0, -9, "restarted", version_before=51, version_restored=38),
        Fault("shard1", 1.0, -9, "restarted", version_before=51, version_restored=38),
    ]
    for fault in restored:
        fault.updates_replayed, fault.pushes_resent = 13, 0
    dense = "restored version 38; the workers re-sent 13 updates it lacked and 0 pushes in flight"
    assert restore_lines(restored, tmp_path) == [
        f"shard0: {dense}; 0 updates lost",
        f"shard1: {dense}; 0 updates lost; its row tables went back to their last save: the "
        "row updates since are lost",
    ]
    assert restore_lines(restored) == [
        f"shard0: {dense}; 0 updates lost",
        f"shard1: {dense}; 0 updates lost",
    ]


def test_the_decision_follows_the_kind_not_the_name() -> None:
    # A worker's process is given up, a shard's is fatal, whatever their names look like.
    book = ProcessBook(JobConfig.from_fields({"cluster.num_workers": 2, "faults.max_restarts": 0}))
    assert _die(book, WORKER1) == "given up"
    with pytest.raises(ChildFailedError):
        _die(book, ProcessSpec(ProcessKind.SHARD, 1))


def _stage_book(max_restarts: int) -> ProcessBook:
    return ProcessBook(
        JobConfig.from_fields(
            {
                "cluster.num_workers": 2,
                "pipeline.num_partitions": 3,
                "faults.max_restarts": max_restarts,
            }
        )
    )


def test_a_stage_restarts_its_whole_replica_counted_once_per_replica() -> None:
    book = _stage_book(max_restarts=1)
    stage = ProcessSpec(ProcessKind.STAGE, 1, stage=2)
    assert stage.name == "worker1.stage2"
    assert _die(book, stage) == "restarted"
    assert book.restarts == {"worker1": 1}
    # Another stage of the same replica draws on the same budget.
    assert _die(book, ProcessSpec(ProcessKind.STAGE, 1, stage=0)) == "given up"
    assert book.given_up == {"worker1"}
    assert _die(book, ProcessSpec(ProcessKind.STAGE, 0, stage=1)) == "restarted"
    with pytest.raises(ChildFailedError, match="all stages died"):
        _die(book, ProcessSpec(ProcessKind.STAGE, 0, stage=1))


def test_a_stage_that_lost_its_neighbour_names_the_error_that_told_it() -> None:
    """Its neighbour hung (SIGSTOP): the fault said only `worker0.stage0 died (exit code 75)`,
    blaming the stage that did nothing wrong and naming nothing of the one that hung."""
    book = _stage_book(max_restarts=1)
    stage = ProcessSpec(ProcessKind.STAGE, 0, stage=0)
    told = "StageTimeoutError: stage 1 did not answer within 3s"
    book.note(Event(NEIGHBOUR_LOST, stage, {"error": told}))
    fault = book.record_death(stage, EXIT_PEER_LOST, stopping=False)
    assert fault.cause == f"a neighbouring stage of its replica was lost: {told}"
    assert describe_fault(fault) == (
        f"worker0.stage0 died (exit code 75: a neighbouring stage of its replica was lost: "
        f"{told}); restarted"
    )
    # A death of its own later says its exit code alone, as before.
    assert book.record_death(stage, -9, stopping=False).cause is None


def test_a_restarted_stage_binds_its_old_address_and_finds_its_next_stage_there() -> None:
    book = _stage_book(max_restarts=1)
    assert book.num_processes(ProcessKind.STAGE) == 6
    for stage, port in ((1, 5001), (2, 5002)):
        source = ProcessSpec(ProcessKind.STAGE, 1, stage=stage)
        book.note(Event("ready", source, {"address": f"tcp://127.0.0.1:{port}"}))
    book.note(Event("ready", ProcessSpec(ProcessKind.STAGE, 1), {"address": None}))
    for stage, step in ((0, 30), (1, 31), (2, 30)):
        source = ProcessSpec(ProcessKind.STAGE, 1, stage=stage)
        book.note(Event("pushed", source, {"rank": 1, "stage": stage, "step": step}))
    book.note(Event("metric", source, {"role": "worker", "rank": 1, "step": 40}))
    first, second, last = (book.spec(ProcessKind.STAGE, 1, stage) for stage in range(3))
    assert (first.bind, first.next_stage) == ("tcp://127.0.0.1:0", "tcp://127.0.0.1:5001")
    assert (second.bind, second.next_stage) == ("tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002")
    assert (last.bind, last.next_stage) == ("tcp://127.0.0.1:5002", "")
    # The stages go on together, after the last push every one of them got applied.
    assert {first.resume_step, second.resume_step, last.resume_step} == {30}


def test_a_restarted_worker_resumes_after_its_last_push_and_its_fault_says_where() -> None:
    book = _book()
    book.note(Event("started", WORKER1, {"rank": 1, "time": 0.0, "step": 0}))
    book.note(Event("pushed", WORKER1, {"rank": 1, "step": 12}))
    assert not book.spec(ProcessKind.WORKER, 1).restarted  # its first life
    fault = book.record_death(WORKER1, -9, stopping=False)
    spec = book.spec(ProcessKind.WORKER, 1)
    assert (spec.resume_step, spec.restarted, fault.resumed_at_step) == (12, True, 12)
    # The shards had taken the push in flight at the death: the next life went on after it.
    book.note(Event("started", spec, {"rank": 1, "time": 0.0, "step": 13}))
    assert fault.resumed_at_step == 13
    assert book.spec(ProcessKind.WORKER, 1).resume_step == 13
    given_up = book.record_death(WORKER1, -9, stopping=False)
    assert (given_up.action, given_up.resumed_at_step) == ("given up", None)


def test_processes_listen_where_their_kind_runs() -> None:
    # Shards on their hosts, stages (workers) on the workers' host, the coordinator on the host.
    config = JobConfig.from_fields(
        {
            "cluster.num_workers": 2,
            "cluster.shard_hosts": ["127.0.0.2", "127.0.0.3"],
            "cluster.worker_host": "127.0.0.4",
            "pipeline.num_partitions": 2,
        }
    )
    book = ProcessBook(config)
    assert book.spec(ProcessKind.SHARD, 1).bind == "tcp://127.0.0.3:0"
    assert book.spec(ProcessKind.STAGE, 0, 1).bind == "tcp://127.0.0.4:0"
    assert book.spec(ProcessKind.COORDINATOR, 0).bind == "tcp://127.0.0.1:0"


def _shard0_ready(book: ProcessBook, restored_version: int | None) -> None:
    ready = {"shard_id": 0, "address": "tcp://127.0.0.1:4321", "restored_version": None}
    book.note(Event("ready", SHARD0, {**ready, "restored_version": restored_version}))


def _shard0_killed_at_9_and_restored_at_5() -> tuple[ProcessBook, Fault]:
    """A book whose shard 0 died at version 9 and came back from its checkpoint of version 5;
    and that death's fault."""
    book = _book(max_restarts=3)
    _shard0_ready(book, None)
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 9}))
    first = book.record_death(SHARD0, -9, stopping=False)
    _shard0_ready(book, 5)
    return book, first


def test_a_shard_killed_again_before_it_counted_the_replays_reports_no_made_up_loss() -> None:
    book, first = _shard0_killed_at_9_and_restored_at_5()
    # Its first heartbeat came before any worker replayed; it dies before the next one.
    recovery = {"updates_replayed": 0, "pushes_resent": 0, "version_seen_before": 5}
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 5, **recovery}))
    assert first.lost_updates == 4  # while it lives, the next heartbeat will say more
    second = book.record_death(SHARD0, -9, stopping=False)
    _shard0_ready(book, 5)
    recovery = {"updates_replayed": 4, "pushes_resent": 0, "version_seen_before": 9}
    book.note(Event("done", SHARD0, {"shard_id": 0, "version": 9, **recovery}))
    assert (first.recovery_cut_short, first.lost_updates) == (True, None)
    assert (second.recovery_cut_short, second.lost_updates) == (False, 0)
    assert describe_restore(first) == (
        "shard0: restored version 5; the workers re-sent 0 updates it lacked and 0 pushes in "
        "flight; it died again before it counted the workers' replays: updates lost unknown"
    )


def test_a_shard_killed_again_after_the_replays_covered_its_loss_keeps_the_count() -> None:
    book, first = _shard0_killed_at_9_and_restored_at_5()
    recovery = {"updates_replayed": 4, "pushes_resent": 0, "version_seen_before": 9}
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 9, **recovery}))
    book.record_death(SHARD0, -9, stopping=False)
    assert (first.recovery_cut_short, first.lost_updates) == (True, 0)


def test_a_shard_killed_again_before_it_restored_marks_nothing_cut_short() -> None:
    book = _book(max_restarts=3)
    first = book.record_death(SHARD0, -9, stopping=False)
    book.record_death(SHARD0, -9, stopping=False)
    assert (first.recovery_cut_short, first.lost_updates) == (False, None)


@pytest.mark.parametrize("spec", [SHARD0, ProcessSpec(ProcessKind.COORDINATOR, 0)])
def test_a_sandblaster_process_given_up_while_the_job_stops_rolls_nothing_back(
    spec: ProcessSpec,
) -> None:
    # Killed after the last iteration, while the shards save: nothing restarts, nothing redone.
    book = _sandblaster_book()
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 15}))
    fault = book.record_death(spec, -9, stopping=True)
    assert (fault.action, fault.rolled_back, fault.lost_updates) == ("given up", False, None)


def test_a_rollback_with_nothing_to_redo_says_so() -> None:
    # A shard killed after the coordinator finished: restored the last version, nothing redone.
    book = _sandblaster_book()
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 22}))
    fault = book.record_death(SHARD0, -9, stopping=False)
    restored = {"shard_id": 0, "address": "tcp://127.0.0.1:4321", "restored_version": 22}
    book.note(Event("ready", SHARD0, restored))
    line = describe_restore(fault)
    assert "redid" not in line and "went back" not in line
    assert line == "shard0: restored version 22, every update it had applied: nothing to redo"
    coordinator = Fault("coordinator", 1.0, -9, "restarted", rolled_back=True, updates_redone=0)
    assert describe_restore(coordinator) == (
        "coordinator: its last checkpoint held every update: nothing to redo"
    )


def test_a_shard_that_died_again_before_it_restored_gets_a_line() -> None:
    book = _book(max_restarts=3)
    book.note(Event("ready", SHARD0, {"shard_id": 0, "address": "tcp://127.0.0.1:4321"}))
    book.note(Event("heartbeat", SHARD0, {"shard_id": 0, "version": 7}))
    first = book.record_death(SHARD0, -9, stopping=False)
    second = book.record_death(SHARD0, -9, stopping=False)  # before its next life restored
    restored = {"shard_id": 0, "address": "tcp://127.0.0.1:4321", "restored_version": 5}
    book.note(Event("ready", SHARD0, restored))
    worker = book.record_death(WORKER0, -9, stopping=False)
    book.record_death(WORKER0, -9, stopping=False)  # workers restore nothing: no line
    assert first.version_restored is None and second.version_restored == 5
    lines = restore_lines([first, second, worker])
    assert lines[0] == (
        "shard0: died again before it restored its checkpoint; updates lost unknown"
    )
    assert lines[1].startswith("shard0: restored version 5")
    assert len(lines) == 2


@pytest.mark.parametrize("algorithm", ["downpour", "sandblaster"])
def test_a_shard_killed_before_it_was_given_the_model_lost_nothing(algorithm: str) -> None:
    # Killed before any worker's INIT: its next life finds no checkpoint and starts afresh.
    book = ProcessBook(
        JobConfig.from_fields({"optimizer.algorithm": algorithm, "cluster.num_shards": 2})
    )
    _shard0_ready(book, None)
    fault = book.record_death(SHARD0, -9, stopping=False)
    _shard0_ready(book, None)
    assert (fault.version_before, fault.version_restored, fault.lost_updates) == (0, 0, 0)
    assert restore_lines([fault]) == [
        "shard0: restored version 0, every update it had applied: nothing to redo"
        if algorithm == "sandblaster"
        else "shard0: restored version 0; 0 updates lost"
    ]


@pytest.mark.parametrize(
    ("kind", "index", "stage", "message"),
    [
        (ProcessKind.SHARD, 2, 0, r"shard index must be an integer in \[0, 2\) .*got 2"),
        (ProcessKind.WORKER, -1, 0, r"worker index must be an integer in \[0, 2\) .*got -1"),
        (ProcessKind.EVALUATOR, 1, 0, r"evaluator index must be an integer in \[0, 1\)"),
        (ProcessKind.SHARD, "0", 0, r"shard index must be an integer .*got '0'"),
        (ProcessKind.STAGE, 0, 1, r"stage 0: stage must be an integer in \[0, 1\)"),
        ("shard", 0, 0, r"kind must be a ProcessKind, got 'shard'"),
    ],
)
def test_a_process_the_job_does_not_have_is_refused(kind, index, stage, message) -> None:
    """``Cluster.start`` of a shard id past the job's shards (say) is a ValueError naming it:
    the process started, then failed in its own traceback."""
    with pytest.raises(ValueError, match=message):
        _book().spec(kind, index, stage)


def test_a_local_cluster_starts_nothing_after_stop_all(tmp_path, monkeypatch) -> None:
    """Leaving a LocalCluster's ``with`` block stops it: a later ``start`` is a ClosedError (it
    started a process that nothing watched)."""
    from distbelief.errors import ClosedError
    from distbelief.launch import local

    monkeypatch.setattr(local, "start_forkserver", lambda: None)  # no forkserver: none starts
    with local.LocalCluster(JobConfig(), tmp_path) as cluster:
        pass
    with pytest.raises(ClosedError, match=r"^LocalCluster: start of shard0 after stop_all\(\)$"):
        cluster.start(ProcessKind.SHARD, 0)
    assert cluster.processes == {}


@pytest.mark.parametrize(
    ("committed", "saved"), [(3, True), (2, False), (None, False)], ids=["last", "older", "none"]
)
def test_a_sandblaster_shard_dead_while_the_job_stops_says_whether_its_state_was_committed(
    tmp_path, committed: int | None, saved: bool
) -> None:
    """Its checkpoints are the coordinator's commits: its last state is saved when the last
    commit is the last iteration the job reached (3), not when a resume goes back further."""
    config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster", "cluster.num_shards": 2})
    book = ProcessBook(config)
    book.record_death(ProcessSpec(ProcessKind.SHARD, 1), -9, stopping=True)
    book.record_death(WORKER0, -9, stopping=True)
    if committed is not None:
        tag = checkpoint_tag(committed)
        (tmp_path / CHECKPOINT_DIR / tag).mkdir(parents=True)
        commit(tmp_path / CHECKPOINT_DIR, tag, committed, {})
    result = RunResult(tmp_path, faults=list(book.faults), coordinator={"iterations": 3})
    # The cluster as the stop leaves it: its book's faults, no shard returned a result.
    stopped = SimpleNamespace(faults=book.faults, results=lambda kind: {})
    add_what_the_stop_settled(result, stopped, config, time_offset_s=0.0)
    shard, worker = result.faults
    assert (shard.process, shard.last_checkpoint_saved) == ("shard1", saved)
    assert worker.last_checkpoint_saved is None
    assert result.coordinator["resumes_from_iteration"] == committed


def test_a_death_before_the_first_worker_started_is_at_the_start_of_the_records_clock() -> None:
    # It was timed from the launch: 2.3 s, printed before the first rows' t=0.1s.
    book = ProcessBook(JobConfig())
    time.sleep(0.05)  # the launch is under way: its own clock has moved on
    fault = book.record_death(SHARD0, -9, stopping=False)
    assert fault.time_s == 0.0
    book.note(Event("started", WORKER0, {"time": time.time() - 1.0}))
    later = book.record_death(SHARD0, -9, stopping=False)
    assert later.time_s >= 1.0
