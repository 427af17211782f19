"""Pipeline schedules: every action once, forwards before backwards, no deadlock, and GPipe's
fill-drain makespan."""

from __future__ import annotations

import pytest

from distbelief.pipeline.schedule import SCHEDULES, gpipe, one_f_one_b

SIZES = [(p, m) for p in range(1, 5) for m in range(1, 9)]


def _simulate(schedule, num_stages: int, num_micro: int) -> dict[tuple[str, int, int], int]:
    """Runs every stage's actions in unit time slots; returns each action's finishing slot.

    A stage can run F(m) once the stage before has finished F(m), and B(m) once the stage
    after has finished B(m) (the last stage: once it has finished its own F(m)).
    """
    plans = [schedule(num_stages, s, num_micro) for s in range(num_stages)]
    positions = [0] * num_stages
    done: dict[tuple[str, int, int], int] = {}
    slot = 0
    while any(pos < len(plan) for pos, plan in zip(positions, plans, strict=True)):
        slot += 1
        ready = []
        for stage, plan in enumerate(plans):
            if positions[stage] == len(plan):
                continue
            kind, micro = plan[positions[stage]]
            if kind == "F":
                needs = ("F", stage - 1, micro) if stage > 0 else None
            elif stage < num_stages - 1:
                needs = ("B", stage + 1, micro)
            else:
                needs = ("F", stage, micro)
            if needs is None or done.get(needs, slot) < slot:
                ready.append((stage, kind, micro))
        assert ready, f"deadlock at slot {slot}: positions {positions}"
        for stage, kind, micro in ready:
            done[(kind, stage, micro)] = slot
            positions[stage] += 1
    return done


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize(("num_stages", "num_micro"), SIZES)
def test_every_action_once_and_forward_before_backward(name, num_stages, num_micro):
    for stage in range(num_stages):
        actions = SCHEDULES[name](num_stages, stage, num_micro)
        expected = {(k, m) for k in "FB" for m in range(num_micro)}
        assert sorted(actions) == sorted(expected)
        for m in range(num_micro):
            assert actions.index(("F", m)) < actions.index(("B", m))
        backwards = [m for kind, m in actions if kind == "B"]
        assert backwards == sorted(backwards)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize(("num_stages", "num_micro"), SIZES)
def test_all_stages_run_to_completion(name, num_stages, num_micro):
    done = _simulate(SCHEDULES[name], num_stages, num_micro)
    assert len(done) == 2 * num_stages * num_micro


@pytest.mark.parametrize(("num_stages", "num_micro"), SIZES)
def test_gpipe_fills_and_drains_in_m_plus_p_minus_1_slots(num_stages, num_micro):
    done = _simulate(gpipe, num_stages, num_micro)
    last_forward = max(slot for (kind, _, _), slot in done.items() if kind == "F")
    assert last_forward == num_micro + num_stages - 1
    assert max(done.values()) == 2 * (num_micro + num_stages - 1)


def test_one_f_one_b_warms_up_then_alternates():
    assert one_f_one_b(3, 0, 4) == [
        ("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)
    ]  # fmt: skip
    assert one_f_one_b(3, 2, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert one_f_one_b(4, 0, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 0, 1), "num_stages must be >= 1"), ((2, 2, 1), r"stage 2 is not in \[0, 2\)"),
     ((2, 0, 0), "num_micro must be >= 1")],
)  # fmt: skip
def test_bad_arguments_are_named(args, message):
    for schedule in SCHEDULES.values():
        with pytest.raises(ValueError, match=message):
            schedule(*args)
