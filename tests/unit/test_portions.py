"""The portion scheduler and the batch plan: who computes which portion, what is counted once,
what a lost worker's work becomes, and how a batch is cut (no sockets)."""

import threading
import time

import pytest
import torch

from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.portions import PortionScheduler, Task
from distbelief.errors import CoordinatorError


def _scheduler(num_portions: int = 4, *, max_holders: int = 2) -> PortionScheduler:
    scheduler = PortionScheduler(
        BatchPlan(num_examples=100, num_portions=num_portions), max_holders=max_holders
    )
    scheduler.open(0, "param")
    return scheduler


def _take(scheduler: PortionScheduler, worker: str) -> Task:
    action, task = scheduler.next_task(worker)
    assert action == "work" and task is not None
    return task


def _commit(scheduler: PortionScheduler, worker: str, bundle: str, portions: list[int]) -> None:
    assert scheduler.claim_bundle(worker, 0, bundle, portions) == "accepted"
    scheduler.committed(0, bundle)


# -- the batch plan


def test_portions_cut_the_batch_into_contiguous_pieces_p_times_n_over_p():
    plan = BatchPlan(num_examples=10, num_portions=3)
    assert [plan.portion_range(p) for p in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert torch.equal(plan.indices(), torch.arange(10))


def test_a_sampled_batch_is_fixed_by_its_seed_and_distinct():
    plan = BatchPlan(num_examples=50, num_portions=4, batch_size=20, seed=3)
    first = plan.indices()
    assert torch.equal(first, BatchPlan.from_json(plan.to_json()).indices())
    assert len(first) == 20 and len(set(first.tolist())) == 20 and int(first.max()) < 50
    other = BatchPlan(num_examples=50, num_portions=4, batch_size=20, seed=4).indices()
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"num_examples": 0, "num_portions": 1}, "num_examples must be an integer >= 1, got 0"),
        ({"num_examples": 5, "num_portions": 6}, r"num_portions must be an integer in \[1, 5\]"),
        ({"num_examples": 5, "num_portions": 2, "batch_size": 9}, r"batch_size must be None"),
        ({"num_examples": 9, "num_portions": 4, "batch_size": 3}, r"in \[1, 3\] .*got 4"),
        ({"num_examples": 5, "num_portions": 1, "seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_a_bad_batch_plan_is_refused_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        BatchPlan(**fields)


def test_a_portion_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match=r"portion must be in \[0, 3\), got 3"):
        BatchPlan(num_examples=10, num_portions=3).portion_range(3)
    with pytest.raises(ValueError, match="malformed batch plan"):
        BatchPlan.from_json({"num_examples": 3})


# -- handing out portions


def test_free_workers_get_the_pending_portions_in_order():
    scheduler = _scheduler(3)
    tasks = [_take(scheduler, worker) for worker in ("a", "b", "c")]
    assert tasks == [Task(0, "param", p, False) for p in range(3)]


def test_backups_go_only_when_nothing_is_pending_to_the_portion_with_fewest_holders():
    scheduler = _scheduler(2, max_holders=3)
    assert [_take(scheduler, w).portion for w in ("a", "b")] == [0, 1]
    backup = _take(scheduler, "c")
    assert (backup.portion, backup.backup) == (0, True)
    assert _take(scheduler, "d").portion == 1  # portion 0 has two holders now, 1 has one
    assert _take(scheduler, "e").portion == 0


def test_backup_copies_are_bounded_and_never_given_to_a_holder():
    scheduler = _scheduler(1, max_holders=2)
    _take(scheduler, "a")
    assert scheduler.next_task("a") == ("wait", None)  # it holds the only portion itself
    assert _take(scheduler, "b").backup
    assert scheduler.next_task("c") == ("wait", None)  # two holders: the bound


def test_without_backups_an_idle_worker_waits():
    scheduler = _scheduler(1, max_holders=1)
    _take(scheduler, "a")
    assert scheduler.next_task("b") == ("wait", None)


def test_a_finished_portion_gets_no_backup():
    scheduler = _scheduler(1)
    _take(scheduler, "a")
    assert scheduler.finish("a", 0, 0, 1.0) == "accepted"
    assert scheduler.next_task("b") == ("wait", None)


def test_a_long_poll_returns_when_work_appears_and_after_its_bound_otherwise():
    scheduler = _scheduler(1)
    _take(scheduler, "a")
    _take(scheduler, "b")
    started = time.monotonic()
    assert scheduler.next_task("c", max_wait_s=0.2) == ("wait", None)
    assert time.monotonic() - started >= 0.2
    threading.Timer(0.1, scheduler.lose, args=("a",)).start()
    threading.Timer(0.1, scheduler.lose, args=("b",)).start()
    action, task = scheduler.next_task("c", max_wait_s=60.0)
    assert (action, task.portion if task else None) == ("work", 0)


def test_a_worker_holding_finished_portions_is_not_held_so_it_can_push():
    scheduler = _scheduler(1)
    _take(scheduler, "a")
    scheduler.finish("a", 0, 0, 1.0)
    started = time.monotonic()
    assert scheduler.next_task("a", max_wait_s=60.0) == ("wait", None)
    assert time.monotonic() - started < 30.0


def test_between_evaluations_workers_wait_and_after_stop_they_stop():
    scheduler = PortionScheduler(BatchPlan(num_examples=4, num_portions=2))
    assert scheduler.next_task("a") == ("wait", None)
    scheduler.stop()
    assert scheduler.next_task("a") == ("stop", None)


def test_evaluations_are_numbered_upwards():
    scheduler = _scheduler()
    with pytest.raises(ValueError, match="evaluation must be an integer above 0, got 0"):
        scheduler.open(0, "param")


# -- answers and bundles


def test_the_first_answer_wins_and_a_duplicate_is_refused():
    scheduler = _scheduler(1)
    _take(scheduler, "a")
    _take(scheduler, "b")  # a backup copy
    assert scheduler.finish("b", 0, 0, 2.0) == "accepted"
    assert scheduler.finish("a", 0, 0, 2.0) == "duplicate"
    _commit(scheduler, "b", "b-1", [0])
    outcome = scheduler.outcome()
    assert outcome is not None and outcome.loss_sum == 2.0
    figures = outcome.figures
    assert (figures.backups_issued, figures.backups_won, figures.duplicates) == (1, 1, 1)
    assert figures.portions_by_worker == {"b": 1}


def test_a_portion_done_by_a_backup_while_the_original_computes_counts_once():
    scheduler = _scheduler(2)
    _take(scheduler, "slow")
    _take(scheduler, "a")
    assert scheduler.finish("a", 0, 1, 1.0) == "accepted"
    assert _take(scheduler, "a").portion == 0  # the backup of slow's portion
    assert scheduler.finish("a", 0, 0, 3.0) == "accepted"
    _commit(scheduler, "a", "a-1", [0, 1])
    assert scheduler.finish("slow", 0, 0, 3.0) == "duplicate"
    outcome = scheduler.outcome()
    assert outcome is not None and outcome.loss_sum == 4.0
    assert outcome.figures.portions_by_worker == {"a": 2}


def test_the_loss_is_the_sum_over_committed_portions_and_only_then_complete():
    scheduler = _scheduler(3)
    for worker, loss in (("a", 0.1), ("b", 0.2), ("c", 0.3)):
        task = _take(scheduler, worker)
        assert scheduler.finish(worker, 0, task.portion, loss) == "accepted"
    _commit(scheduler, "a", "a-1", [0])
    _commit(scheduler, "b", "b-1", [1])
    assert scheduler.outcome() is None  # c's portion is done but not committed
    _commit(scheduler, "c", "c-1", [2])
    outcome = scheduler.outcome()
    assert outcome is not None
    assert (outcome.evaluation, outcome.loss_sum, outcome.num_examples) == (0, 0.6, 100)


def test_a_report_for_another_evaluation_is_stale():
    scheduler = _scheduler(1)
    _take(scheduler, "a")
    scheduler.close()
    scheduler.open(1, "trial")
    assert scheduler.finish("a", 0, 0, 1.0) == "stale"
    assert scheduler.claim_bundle("a", 0, "a-1", [0]) == "stale"
    assert _take(scheduler, "a") == Task(1, "trial", 0, False)


def test_malformed_reports_are_refused_with_a_clear_error():
    scheduler = _scheduler(2)
    with pytest.raises(ValueError, match="portion 1 of evaluation 0 was not given to a"):
        scheduler.finish("a", 0, 1, 1.0)
    with pytest.raises(ValueError, match=r"portion must be in \[0, 2\), got 5"):
        scheduler.finish("a", 0, 5, 1.0)
    with pytest.raises(ValueError, match="a bundle lists distinct portions"):
        scheduler.claim_bundle("a", 0, "a-1", [0, 0])
    with pytest.raises(ValueError, match="a bundle lists distinct portions"):
        scheduler.claim_bundle("a", 0, "a-1", [])


@pytest.mark.parametrize("portions", [[[0]], [0, {"p": 1}]])
def test_a_bundle_listing_anything_but_portion_numbers_is_refused(portions):
    scheduler = _scheduler(2)
    _take(scheduler, "a")
    assert scheduler.finish("a", 0, 0, 1.0) == "accepted"
    with pytest.raises(ValueError, match="a bundle lists distinct portions"):
        scheduler.claim_bundle("a", 0, "a-1", portions)
    assert scheduler.claim_bundle("a", 0, "a-1", [0]) == "accepted"


def test_a_bundle_with_a_portion_not_done_by_its_worker_is_refused_and_its_own_return():
    scheduler = _scheduler(2)
    _take(scheduler, "a")
    _take(scheduler, "b")
    scheduler.finish("a", 0, 0, 1.0)
    scheduler.finish("b", 0, 1, 1.0)
    assert scheduler.claim_bundle("a", 0, "a-1", [0, 1]) == "refused"
    assert _take(scheduler, "c").portion == 0  # a's own portion was handed out again
    assert scheduler.claim_bundle("b", 0, "b-1", [1]) == "accepted"


# -- lost workers


def test_a_lost_workers_uncommitted_portions_return_and_its_later_reports_are_refused():
    scheduler = _scheduler(3)
    for worker in ("a", "b", "c"):
        _take(scheduler, worker)
    scheduler.finish("a", 0, 0, 1.0)
    _commit(scheduler, "a", "a-1", [0])
    assert _take(scheduler, "a").portion == 1  # a backup of b's portion
    scheduler.finish("b", 0, 1, 5.0)
    assert scheduler.lose("b") == 1  # done, not committed: pending again (a still holds it)
    assert scheduler.finish("b", 0, 1, 5.0) == "lost"
    assert scheduler.claim_bundle("b", 0, "b-1", [1]) == "lost"
    assert scheduler.next_task("b") == ("lost", None)
    assert scheduler.finish("a", 0, 1, 2.0) == "accepted"
    scheduler.finish("c", 0, 2, 3.0)
    _commit(scheduler, "a", "a-2", [1])
    _commit(scheduler, "c", "c-1", [2])
    outcome = scheduler.outcome()
    assert outcome is not None and outcome.loss_sum == 6.0  # a's 1 + 2 and c's 3
    assert outcome.figures.reassigned == 1
    assert outcome.figures.portions_by_worker == {"a": 2, "c": 1}


def test_a_lost_workers_committed_and_committing_portions_stay():
    scheduler = _scheduler(3)
    for worker in ("a", "a", "b"):
        scheduler.finish(worker, 0, _take(scheduler, worker).portion, 1.0)
    _commit(scheduler, "a", "a-1", [0])
    assert scheduler.claim_bundle("a", 0, "a-2", [1]) == "accepted"  # being committed
    assert scheduler.lose("a") == 0
    scheduler.committed(0, "a-2")
    _commit(scheduler, "b", "b-1", [2])
    outcome = scheduler.outcome()
    assert outcome is not None and outcome.figures.portions_by_worker == {"a": 2, "b": 1}


def test_a_lost_workers_held_portion_is_handed_out_again():
    scheduler = _scheduler(1, max_holders=1)
    _take(scheduler, "a")
    assert scheduler.lose("a") == 1
    assert _take(scheduler, "b") == Task(0, "param", 0, False)


def test_silent_workers_are_those_holding_finished_uncommitted_portions():
    scheduler = _scheduler(2)
    scheduler.finish("a", 0, _take(scheduler, "a").portion, 1.0)
    _take(scheduler, "b")  # computing: silence is expected
    time.sleep(0.05)
    assert scheduler.silent_workers(0.01) == ["a"]
    assert scheduler.silent_workers(60.0) == []


def test_a_failed_commit_fails_the_evaluation():
    scheduler = _scheduler(1)
    scheduler.finish("a", 0, _take(scheduler, "a").portion, 1.0)
    assert scheduler.claim_bundle("a", 0, "a-1", [0]) == "accepted"
    scheduler.commit_failed(0, "a-1", RuntimeError("shard 1 is gone"))
    with pytest.raises(CoordinatorError, match="evaluation 0: committing bundle 'a-1' failed"):
        scheduler.outcome()


def test_a_late_bundle_of_an_evaluation_already_over_is_no_error_of_the_coordinator(caplog):
    """After a shard restart the coordinator goes back to its checkpoint and opens a new
    evaluation; a bundle of the old one committed late is refused by the shards, which was
    logged as an ERROR of a run that recovered and ended well."""
    import logging

    from distbelief.coordinator.service import CoordinatorService
    from distbelief.errors import RemoteError

    def refused(evaluation: int, bundle: str) -> None:
        raise RemoteError(f"commit of {bundle!r} is for evaluation {evaluation}, not open")

    service = CoordinatorService(
        BatchPlan(num_examples=100, num_portions=2, batch_size=100), refused
    )
    service.scheduler.open(8, "point")
    service.scheduler.close()
    service.scheduler.open(9, "point")
    with caplog.at_level(logging.WARNING, logger="distbelief.coordinator.service"):
        assert not service.commit_bundle("worker1", 8, "late")
        assert not service.commit_bundle("worker1", 9, "now")  # the open one's: an error
    assert [(r.levelname, "late" in r.getMessage()) for r in caplog.records] == [
        ("WARNING", True),
        ("ERROR", False),
    ]
