"""The coordinator's WORK and BUNDLE handlers, called as the request layer calls them: a
malformed request is refused as a bad request, and changes nothing."""

from __future__ import annotations

import pytest

from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.protocol import WORK
from distbelief.coordinator.service import CoordinatorService
from distbelief.wire import Message
from distbelief.wire.error_kinds import kind_of

WORKER = {"worker": "w", "session": "s"}


def _service() -> CoordinatorService:
    service = CoordinatorService(BatchPlan(num_examples=100, num_portions=4), lambda e, b: None)
    service.scheduler.open(1, "param")
    return service


def _refused(handler, meta: dict) -> ValueError:
    with pytest.raises(ValueError) as refused:
        handler(Message(WORK, meta))
    assert kind_of(refused.value) == "bad_request"
    return refused.value


def test_a_loss_sum_beyond_any_float_is_refused_as_malformed():
    connection = _service().open_connection("127.0.0.1:1")
    task = connection._work(Message(WORK, dict(WORKER, max_wait_s=0))).meta["task"]
    finished = {"evaluation": 1, "portion": task["portion"], "loss_sum": "0x1p+99999"}
    error = _refused(connection._work, dict(WORKER, finished=finished))
    assert "loss_sum must be a float.hex string" in str(error)


def test_a_report_refused_for_its_max_wait_s_is_not_recorded():
    service = _service()
    connection = service.open_connection("127.0.0.1:1")
    portion = connection._work(Message(WORK, dict(WORKER, max_wait_s=0))).meta["task"]["portion"]
    finished = {"evaluation": 1, "portion": portion, "loss_sum": (2.5).hex()}
    error = _refused(connection._work, dict(WORKER, finished=finished, max_wait_s="soon"))
    assert "max_wait_s must be a number" in str(error)
    reply = connection._work(Message(WORK, dict(WORKER, finished=finished, max_wait_s=0)))
    assert reply.meta["finished"] == "accepted"
