"""The evaluator's loop: an evaluation under way as the job stops is cut short (its
parameters are no longer the last), and the last one starts at once and runs whole."""

from __future__ import annotations

import threading

from distbelief.evaluator.run import _evaluate_until_stopped


class _SlowEvaluator:
    """Its first evaluation sees the job stop half-way; it records how each was called."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.calls: list[bool] = []  # whether each call could be cut short

    def evaluate(self, cut_short=None):
        self.calls.append(cut_short is not None)
        if len(self.calls) == 1:
            self.stop.set()  # the workers finish while it evaluates
            assert cut_short is not None and cut_short()
            return None  # cut short, as a click model's evaluation between two passes
        return {"test_loss": 0.5, "test_accuracy": 0.9, "version": 7}


def test_an_evaluation_under_way_as_the_job_stops_gives_way_to_the_last():
    """At --embedding-dim 65536 an evaluation takes minutes: one under way when the job
    stopped ran to its end before the last began (the launcher said the evaluator had not
    exited 60 s after it was asked to)."""
    stop = threading.Event()
    evaluator = _SlowEvaluator(stop)
    emitted = []
    result = _evaluate_until_stopped(
        evaluator, 60.0, lambda kind, row: emitted.append((kind, row)), start_time=0.0, stop=stop
    )
    assert evaluator.calls == [True, False]  # the last is not to be cut
    assert result["version"] == 7
    assert [(kind, row["version"]) for kind, row in emitted] == [("metric", 7), ("evaluated", 7)]
