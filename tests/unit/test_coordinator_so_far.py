"""An interrupted or failed Sandblaster run's summary.json has its coordinator's progress from
the rows it wrote, when the coordinator returned no result (it was stopped first)."""

from distbelief.launch.supervise import EventRouter


class _Sink:
    def __init__(self):
        self.rows = []

    def write(self, record):
        self.rows.append(record)


def _row(step, evaluations, loss):
    return {
        "time_s": float(step),
        "role": "coordinator",
        "rank": 0,
        "step": step,
        "loss": loss,
        "grad_norm": 1.0,
        "step_size": 1.0,
        "evaluations": evaluations,
        "portions": 4,
        "backups": 0,
        "backups_won": 0,
    }


def test_the_last_iteration_and_the_evaluations_of_every_iteration_once():
    route = EventRouter(_Sink())
    # Stopped before its first iteration ended: summary.json says so (it said nothing).
    assert route.coordinator_so_far() == {"stop_reason": "stopped"}
    for step, evaluations in [(0, 1), (1, 3), (2, 1), (3, 2)]:
        route._write(_row(step, evaluations, 1.0 / (step + 1)))
    route._write(_row(2, 1, 0.3))  # rolled back to iteration 1: 2 and 3 are redone
    route._write(_row(3, 2, 0.2))
    so_far = route.coordinator_so_far()
    assert so_far["iterations"] == 3
    assert so_far["loss"] == 0.2
    assert so_far["stop_reason"] == "stopped"
    assert so_far["evaluations"] == 1 + 3 + 1 + 2
    assert so_far["last_iteration"]["step"] == 3


def test_a_resumed_launch_that_saw_no_iteration_0_does_not_count_evaluations():
    route = EventRouter(_Sink())
    route._write(_row(5, 1, 0.5))
    route._write(_row(6, 2, 0.4))
    assert route.coordinator_so_far()["evaluations"] is None
    assert route.coordinator_so_far()["iterations"] == 6
