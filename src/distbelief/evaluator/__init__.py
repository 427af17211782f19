"""The evaluator role: the shards' parameters measured on the test set, during a job
(``run_evaluator``) or against running shards (``watch_shards``); and ``evaluate``, the one
measure of a model's test loss and accuracy."""

from distbelief.evaluator.accuracy import evaluate
from distbelief.evaluator.ps import PSEvaluator
from distbelief.evaluator.run import format_result, run_evaluator, watch_shards

__all__ = ["PSEvaluator", "evaluate", "format_result", "run_evaluator", "watch_shards"]
