"""The coordinator's process function: commit a new run's start point, serve the workers, run
L-BFGS on the shards' vectors, checkpoint every few seconds at an iteration's end, report each
iteration, tell the workers to stop. Run by the launcher's children; reports through ``emit``
and knows nothing of who started it. It holds the model's layout (built on the meta device),
and its values only to give a new run's shards their start point.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from distbelief.client import ParameterServerClient
from distbelief.client.vectors import ShardVectors
from distbelief.coordinator import checkpoint
from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.lbfgs import IterationRecord, LBFGSSettings, SandblasterLBFGS
from distbelief.coordinator.portions import EvaluationOutcome
from distbelief.coordinator.service import CoordinatorService
from distbelief.data import ArrayDataset, load_job_dataset
from distbelief.errors import CoordinatorError, RemoteError, ShardRestartedError
from distbelief.models import build_model
from distbelief.process import Emit, StopFlag
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.telemetry.metrics import make_record
from distbelief.wire import serve
from distbelief.wire.vector_program import Program
from distbelief.worker.replica import build_replica

if TYPE_CHECKING:
    from distbelief.config import FaultsConfig, JobConfig
    from distbelief.wire.security import WireSecurity

logger = logging.getLogger(__name__)

_WORKER_RANK = re.compile(r"^worker(\d+)-")


def batch_plan(config: JobConfig, num_examples: int) -> BatchPlan:
    """The batch every evaluation of the job uses, over a training set of ``num_examples``."""
    return BatchPlan(
        num_examples=num_examples,
        num_portions=config.sandblaster.num_portions(config.cluster.num_workers),
        batch_size=config.optimizer.batch_size,
        seed=config.model.seed,
    )


def lbfgs_settings(config: JobConfig) -> LBFGSSettings:
    return LBFGSSettings(
        history_size=config.sandblaster.history,
        lr=config.sandblaster.step_size,
        line_search=config.sandblaster.line_search,
        max_iterations=config.sandblaster.max_iterations,
        max_evaluations=config.sandblaster.max_evaluations,
    )


class _Reporter:
    """Turns iterations into metrics records: the coordinator's, and each worker's portions."""

    def __init__(self, emit: Emit, num_workers: int, start_time: float) -> None:
        self.emit = emit
        self.num_workers = num_workers
        self.start_time = start_time
        self.outcomes: list[EvaluationOutcome] = []

    def iteration(self, record: IterationRecord) -> dict[str, Any]:
        time_s = time.time() - self.start_time
        portions = dict.fromkeys(range(self.num_workers), 0)
        figures = [outcome.figures for outcome in self.outcomes]
        for item in figures:
            for life, count in item.portions_by_worker.items():
                match = _WORKER_RANK.match(life)
                if match is not None:
                    rank = int(match.group(1))
                    portions[rank] = portions.get(rank, 0) + count
        fields = {
            "step": record.iteration,
            "loss": record.loss,
            "grad_norm": record.grad_norm,
            "step_size": record.step_size,
            "evaluations": record.num_evaluations,
            "portions": sum(portions.values()),
            "backups": sum(item.backups_issued for item in figures),
            "backups_won": sum(item.backups_won for item in figures),
        }
        self.emit("metric", make_record("coordinator", 0, time_s=time_s, **fields))
        for rank, count in portions.items():
            worker = {"step": record.iteration, "portions": count}
            self.emit("metric", make_record("worker", rank, time_s=time_s, **worker))
        self.outcomes = []
        return {**fields, "portions_by_worker": portions}


def run_coordinator(
    config: JobConfig,
    addresses: Sequence[str],
    *,
    bind: str,
    emit: Emit,
    stop: StopFlag,
    checkpoint_dir: str,
    security: WireSecurity | None = None,
    start_time: float = 0.0,
) -> dict[str, Any]:
    """Serve the workers at ``bind`` and run Sandblaster L-BFGS to its end (the iterations, or
    convergence), or until ``stop``; resumes from the last checkpoint in ``checkpoint_dir``.

    Emits "ready" (``address``) once the workers can connect, and per iteration a
    ``coordinator`` metric record and one ``worker`` record per worker (its portions).

    Returns:
        The iterations run, the last loss, why it stopped, the evaluations.

    Raises:
        EvaluationStalledError: no portion was finished for the request timeout plus the retry
            timeout (no live worker).
        ShardTimeoutError, ShardUnavailableError: a shard did not answer.
        CheckpointError: the checkpoint to resume from is unreadable.
    """
    train_set = load_job_dataset(config.data, "train", download=False)
    plan = batch_plan(config, len(train_set))
    with torch.device("meta"):  # the layout only: the values live on the shards
        model = build_model(config.model.name, train_set.input_shape, train_set.num_classes)
    client = ParameterServerClient(
        list(addresses),
        tensor_specs(model.named_parameters()),
        timeout_s=config.faults.timeout_s,
        retry_timeout_s=config.faults.retry_timeout_s,
        security=security,
    )
    vectors = ShardVectors(client)

    def commit(evaluation: int, bundle: str) -> None:
        program = Program()
        program.commit(evaluation, bundle)
        vectors.run(program)

    service = CoordinatorService(
        plan,
        commit,
        max_holders=2 if config.sandblaster.backup_tasks else 1,
        worker_silence_s=config.faults.timeout_s,
    )
    # A thread per connection: the coordinator's handlers wait for each other (long polls).
    server = serve(bind, service, security=security, design="threads")
    emit("ready", {"address": server.address})
    try:
        resumed = checkpoint.read_record(checkpoint_dir) is not None
        if resumed:
            client.handshake(None)  # the shards restore its folder as they start
        else:
            # The shards save only when told: a first checkpoint before any evaluation.
            initial = _initial_values(config, train_set)
            client.handshake(initial)  # as the workers do: the first to come wins, all alike
            settings = lbfgs_settings(config)
            commit_start_point(vectors, initial, settings, checkpoint_dir, config.faults)
        return _optimize(config, vectors, service, emit, stop, checkpoint_dir, start_time, resumed)
    finally:
        server.stop()
        client.close(wait=False)


def _optimize(
    config: JobConfig,
    vectors: ShardVectors,
    service: CoordinatorService,
    emit: Emit,
    stop: StopFlag,
    checkpoint_dir: str,
    start_time: float,
    resumed: bool,
) -> dict[str, Any]:
    reporter = _Reporter(emit, config.cluster.num_workers, start_time)
    stall_timeout_s = config.faults.timeout_s + config.faults.retry_timeout_s

    def evaluate(evaluation: int, point: str) -> EvaluationOutcome:
        outcome = service.evaluate(evaluation, point, timeout_s=stall_timeout_s)
        reporter.outcomes.append(outcome)
        return outcome

    lbfgs = SandblasterLBFGS(vectors, evaluate, lbfgs_settings(config))
    saved_iteration = 0  # the start point, just committed
    if resumed:
        # Where the previous coordinator got to, only the launcher knows (its records).
        saved_iteration = _go_back(lbfgs, vectors, checkpoint_dir, emit, from_iteration=None)
    emit("started", {"rank": 0, "time": time.time()})
    last_save_s = time.monotonic()
    last: dict[str, Any] = {}
    finished = saved_iteration  # the last iteration finished (step() counts one as it starts)
    rollbacks = 0
    while True:
        try:
            if lbfgs.stop_reason is not None or stop.is_set():
                # The last save is rolled back too when a shard restarts under it (its
                # vectors are then its checkpoint's): the iterations since are done again.
                if lbfgs.state.iteration != saved_iteration:
                    saved_iteration = _save(lbfgs, vectors, checkpoint_dir)
                break
            first = not lbfgs.started
            last = reporter.iteration(lbfgs.start() if first else lbfgs.step())
            finished = lbfgs.state.iteration
            # Iteration 0 is saved at once: a resume or rollback then never evaluates again.
            if first or time.monotonic() - last_save_s >= config.server.checkpoint_every_s:
                saved_iteration = _save(lbfgs, vectors, checkpoint_dir)
                last_save_s = time.monotonic()
        except (ShardRestartedError, CoordinatorError):
            # A restarted shard holds its last checkpoint's vectors: every shard and this
            # coordinator go back to the last committed checkpoint, and go on from there.
            if not vectors.shard_restarted or rollbacks >= config.faults.max_restarts:
                raise
            rollbacks += 1
            reporter.outcomes = []
            saved_iteration = _go_back(
                lbfgs, vectors, checkpoint_dir, emit, from_iteration=finished
            )
            finished = saved_iteration
    # Every worker of the job is waited for: one still starting up must find us to be told.
    workers = [f"worker{rank}" for rank in range(config.cluster.num_workers)]
    untold = service.finish(config.faults.timeout_s, expected=workers)
    if untold:
        # Said as a warning when the run ended by itself: a job stopped early (Ctrl-C) stops
        # its workers itself, and a worker that had not asked yet is no news then.
        level = logging.INFO if stop.is_set() else logging.WARNING
        logger.log(level, "%d worker(s) were not told to stop", untold)
    state = lbfgs.state
    return {
        "iterations": state.iteration,
        "loss": state.loss,
        "stop_reason": state.stop_reason or "stopped",
        "evaluations": state.num_evaluations,
        "last_iteration": last,
        "worker_hosts": dict(service.worker_hosts),
    }


def _go_back(
    lbfgs: SandblasterLBFGS,
    vectors: ShardVectors,
    checkpoint_dir: str,
    emit: Emit,
    *,
    from_iteration: int | None,
) -> int:
    """Every shard and the coordinator's state back to the last committed checkpoint;
    returns its iteration. Evaluation numbers keep growing (workers may hold older ones).

    Emits "rolled_back" with ``from_iteration`` (the iterations done before: None when this
    coordinator has done none, having just started) and ``to_iteration``: the launcher counts
    the iterations the job does again from it. The start point's checkpoint holds L-BFGS not
    yet started: the next iteration is its first evaluation."""
    saved = checkpoint.read_record(checkpoint_dir)
    assert saved is not None
    evaluations_so_far = lbfgs.state.evaluation
    lbfgs.load_state_dict(saved["state"])
    lbfgs.state.evaluation = max(lbfgs.state.evaluation, evaluations_so_far)
    vectors.run(Program(), restore=saved["tag"])
    logger.warning("back at iteration %d (%s)", lbfgs.state.iteration, saved["tag"])
    emit("rolled_back", {"from_iteration": from_iteration, "to_iteration": lbfgs.state.iteration})
    return lbfgs.state.iteration


def _initial_values(config: JobConfig, train_set: ArrayDataset) -> dict[torch.dtype, torch.Tensor]:
    """The model's initial values, flattened as the shards hold them: the workers' own."""
    model = build_replica(config, train_set.input_shape, train_set.num_classes)
    return FlatLayout(tensor_specs(model.named_parameters())).flatten(list(model.parameters()))


def commit_start_point(
    vectors: ShardVectors,
    initial: dict[torch.dtype, torch.Tensor],
    settings: LBFGSSettings,
    checkpoint_dir: str,
    faults: FaultsConfig,
) -> None:
    """Commit the shards' parameters, ``initial`` (they hold them: a handshake gave them), as
    the run's first checkpoint, L-BFGS not yet started, before any evaluation: from then on
    a restarted shard restores them, and the coordinator goes back to them.

    A shard restarted since the handshake holds nothing and refuses the save: it is given
    ``initial`` again and the save tried again, up to ``faults.max_restarts`` times.

    Raises:
        RemoteError: a shard refused the save for another reason, or too many times.
        ShardTimeoutError, ShardUnavailableError: a shard did not answer.
    """
    start = SandblasterLBFGS(vectors, _no_evaluations, settings)
    for attempt in itertools.count():
        try:
            _save(start, vectors, checkpoint_dir)
            return
        except RemoteError:
            if attempt >= faults.max_restarts or not vectors.client.handshake(initial):
                raise
            logger.warning("a shard restarted before the first checkpoint: given the model again")


def _no_evaluations(evaluation: int, point: str) -> EvaluationOutcome:
    raise AssertionError("the start point is saved before any evaluation")


def _save(lbfgs: SandblasterLBFGS, vectors: ShardVectors, checkpoint_dir: str) -> int:
    """Every shard saves, then the coordinator commits its state; returns the iteration."""
    iteration = lbfgs.state.iteration
    tag = checkpoint.checkpoint_tag(iteration, started=lbfgs.started)
    vectors.run(Program(), checkpoint=tag)
    checkpoint.commit(checkpoint_dir, tag, iteration, lbfgs.state_dict())
    return iteration
