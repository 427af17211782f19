"""The evaluator's process functions: evaluate the shards' parameters periodically and once
more at the end of a job (``run_evaluator``, inside ``train``), or watch running shards (the
``distbelief eval`` command). It only reads from the shards, never pushes.

Cost to the workers: evaluating every 0.5 s left 2 workers x 2 shards (LeNet, digits, 2 CPUs)
at 1.00x the steps/s of ``--no-eval`` (median of 5 interleaved pairs, 0.93-1.13 each); one
evaluation takes ~20 ms of one core (benchmarks/results/evaluator_cost_cpu2_20261124.json).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distbelief.errors import ShardTimeoutError, ShardUnavailableError
from distbelief.evaluator.ps import PSEvaluator
from distbelief.files import check_folder_can_be_made, make_folder
from distbelief.process import Emit, StopFlag
from distbelief.telemetry.metrics import (
    EVALUATED,
    EVALUATION_FIELDS,
    PARTITION_VERSIONS,
    MetricsWriter,
    check_appendable,
    make_record,
)

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity

logger = logging.getLogger(__name__)

_STOP_POLL_S = 0.2
"""Longest wait on the stop flag in one call, so SIGTERM's SystemExit is raised promptly."""

METRICS_FILE = "metrics.csv"


def make_evaluator(
    config: JobConfig, addresses: Sequence[str], *, security: WireSecurity | None = None
):
    """The job's evaluator: a click model's (``CtrEvaluator``: loss, accuracy and AUC) or a
    classifier's (``PSEvaluator``)."""
    if config.model.name == "dlrm":
        from distbelief.evaluator.ctr import CtrEvaluator

        return CtrEvaluator(config, addresses, security=security)
    return PSEvaluator(config, addresses, security=security)


def _wait_for(stop: StopFlag) -> None:
    while not stop.wait(_STOP_POLL_S):
        pass


def _sleep_unless_stopped(stop: StopFlag, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left_s := deadline - time.monotonic()) > 0:
        stop.wait(min(left_s, _STOP_POLL_S))


def _evaluate_until_stopped(
    evaluator: PSEvaluator,
    every_s: float,
    emit: Emit,
    start_time: float,
    stop: StopFlag,
    latest: dict | None = None,
) -> dict:
    """Evaluate now and every ``every_s`` until ``stop``, then once more; a parameter version
    already evaluated is not reported twice. Returns the last result (kept in ``latest`` too,
    when given, as each evaluation ends)."""
    last_versions = None
    while True:
        # Read the flag before evaluating: an evaluation that starts after the stop is the last.
        stopping = stop.is_set()
        # One under way as the job stops measures parameters that are no longer the last:
        # cut short, it leaves the last one to start at once (a click model's evaluation of
        # wide rows takes minutes).
        result = evaluator.evaluate(cut_short=None if stopping else stop.is_set)
        if result is None:
            continue
        if latest is not None:
            latest.clear()
            latest.update(result)
        versions = (result["version"], result.get(PARTITION_VERSIONS))
        if versions != last_versions:
            _report(emit, result, start_time)
            last_versions = versions
        if stopping:
            return result
        _sleep_unless_stopped(stop, every_s)


def _report(emit: Emit, result: dict, start_time: float) -> None:
    emit("metric", _metrics_row(result, start_time))
    emit(EVALUATED, result)


def _metrics_row(result: dict, start_time: float) -> dict:
    """The evaluator's metrics.csv row of ``result`` (its columns only: a partitioned model's
    versions are the result's, the row's ``version`` their lowest)."""
    fields = {key: value for key, value in result.items() if key != PARTITION_VERSIONS}
    return make_record("evaluator", 0, time_s=time.time() - start_time, **fields)


def run_evaluator(
    config: JobConfig,
    addresses: Sequence[str],
    *,
    emit: Emit,
    start_time: float,
    stop: StopFlag,
    security: WireSecurity | None = None,
) -> dict:
    """The launcher's evaluator process: evaluates the shards' parameters every
    ``config.reporting.eval_every_s`` until ``stop`` and once more after it; with
    ``config.reporting.eval_during_training`` False, only once, after ``stop``.

    Returns:
        The last evaluation: ``test_loss``, ``test_accuracy`` and ``version`` (and a
        partitioned model's ``partition_versions``).

    Raises:
        ShardTimeoutError, ShardUnavailableError, ModelMismatchError: see ``PSEvaluator``.
    """
    torch.set_num_threads(1)
    evaluator = make_evaluator(config, addresses, security=security)
    try:
        if config.reporting.eval_during_training:
            return _evaluate_until_stopped(
                evaluator, config.reporting.eval_every_s, emit, start_time, stop
            )
        # The one-shot evaluator idles (no requests, no compute) until the workers are done.
        _wait_for(stop)
        result = evaluator.evaluate()
        _report(emit, result, start_time)
        return result
    finally:
        evaluator.close()


def format_result(result: dict) -> str:
    """``test_loss=... test_accuracy=... [test_auc=...] version=... [partition_versions=V,V]``:
    one parseable line."""
    auc = result.get("test_auc")
    partitions = result.get(PARTITION_VERSIONS)
    return (
        f"test_loss={result['test_loss']:.4f} test_accuracy={result['test_accuracy']:.4f} "
        + ("" if auc is None else f"test_auc={auc:.4f} ")
        + f"version={result['version']}"
        + ("" if partitions is None else f" {PARTITION_VERSIONS}={','.join(map(str, partitions))}")
    )


def watch_shards(
    config: JobConfig,
    addresses: Sequence[str],
    *,
    out_dir: str = "",
    once: bool = False,
    stop: StopFlag | None = None,
    security: WireSecurity | None = None,
) -> dict:
    """The ``distbelief eval`` command: evaluate running shards once, or every
    ``config.reporting.eval_every_s`` until ``stop`` (or Ctrl-C, or the shards go away), logging
    each evaluation and appending it to ``<out_dir>/metrics.csv`` when ``out_dir`` is given.

    Returns:
        The last evaluation: ``test_loss``, ``test_accuracy`` and ``version`` (and a
        partitioned model's ``partition_versions``).

    Raises:
        ShardTimeoutError, ShardUnavailableError, ModelMismatchError: before or at the first
            evaluation (see ``PSEvaluator``); later, shards that went away end the watch, and
            a shard that is there but does not answer in time raises ``ShardTimeoutError``
            (with the last evaluation in its message).
        ValueError: ``out_dir`` is a file or cannot be created, or ``<out_dir>/metrics.csv``
            has another header.
    """
    path = Path(out_dir) / METRICS_FILE if out_dir and not once else None
    if path is not None:
        # Before reaching the shards: a metrics.csv it cannot append to is refused first. The
        # folder and the file are made with the first evaluation: a refused watch leaves none.
        check_folder_can_be_made(out_dir, "--out")
        check_appendable(path)
    torch.set_num_threads(1)
    start_time = time.time()
    with contextlib.ExitStack() as files:
        evaluator = make_evaluator(config, addresses, security=security)
        try:
            if once:
                return evaluator.evaluate()
            return _watch(evaluator, config.reporting.eval_every_s, files, path, start_time, stop)
        finally:
            evaluator.close()


def _watch(
    evaluator: PSEvaluator,
    every_s: float,
    files: contextlib.ExitStack,
    path: Path | None,
    start_time: float,
    stop: StopFlag | None,
) -> dict:
    last: dict = {}
    writer: MetricsWriter | None = None

    def emit(kind: str, record: dict) -> None:
        nonlocal writer
        if kind != "metric":  # the whole evaluation: ``last`` has it already
            return
        offset_s = 0.0
        if path is not None:
            if writer is None:
                make_folder(path.parent, "--out")
                writer = files.enter_context(MetricsWriter(path, append=True))
            writer.write(record)
            offset_s = writer.time_offset_s  # appended rows go on from the file's last time
        # t= as metrics.csv has the row, as a job's eval lines say it.
        logger.info("eval t=%.1fs %s", record["time_s"] + offset_s, format_result(last))

    try:
        return _evaluate_until_stopped(
            evaluator,
            every_s,
            emit,
            start_time,
            stop if stop is not None else threading.Event(),
            latest=last,
        )
    except ShardUnavailableError as e:
        if not last:
            raise
        # The normal end of a watched job: its shards stopped.
        logger.warning("shards stopped answering (%s); last evaluation: %s", e, format_result(last))
        return {key: last[key] for key in EVALUATION_FIELDS if last.get(key) is not None}
    except ShardTimeoutError as e:
        if not last:
            raise
        # Not an end of the job: a shard that is still there and does not answer (stopped,
        # overloaded, cut off) is a fault the user has to look at.
        said = (
            f"the shard is still there but not answering (last evaluation: {format_result(last)})"
        )
        raise ShardTimeoutError(f"{e}; {said}") from e
