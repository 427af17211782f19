"""A resumed model-parallel run's summary.json keeps the split as its first launch chose it:
the split points come back from config.json, and the plan made again from them would call them
given by the user (losing the measured basis, the costs and the description)."""

import json

from distbelief.launch.job_plan import earlier_plan

AGAIN = {
    "split_points": [3],
    "basis": "given",
    "stage_costs": [1000.0, 100.0],
    "imbalance": 1.8,
    "stage_state_bytes": [5248000, 683720],
    "description": "2 partitions given: ...",
}
FIRST = {
    "split_points": [3],
    "basis": "time",
    "stage_costs": [0.035, 0.036],
    "imbalance": 1.01,
    "stage_state_bytes": [5248000, 683720],
    "description": "2 partitions by measured time: ...",
}


def test_the_first_launchs_basis_costs_and_description_are_kept(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"outcome": "done", "partitions": FIRST}))
    assert earlier_plan(tmp_path, AGAIN) == FIRST


def test_without_an_earlier_plan_of_the_same_points_the_new_one_stands(tmp_path):
    assert earlier_plan(tmp_path, AGAIN) == AGAIN  # no summary.json
    (tmp_path / "summary.json").write_text("{cut off")
    assert earlier_plan(tmp_path, AGAIN) == AGAIN
    (tmp_path / "summary.json").write_text(json.dumps({"outcome": "failed"}))
    assert earlier_plan(tmp_path, AGAIN) == AGAIN
    other = {**FIRST, "split_points": [4]}
    (tmp_path / "summary.json").write_text(json.dumps({"partitions": other}))
    assert earlier_plan(tmp_path, AGAIN) == AGAIN
