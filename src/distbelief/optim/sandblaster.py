"""The worker side of Sandblaster L-BFGS (Dean et al. 2012, section 4.2): compute the loss and
gradient sums of the portions the coordinator hands out, at the point it names, and push the
gradients of accepted portions to the shards in bundles. It never changes the parameters the
shards hold: the coordinator's vector programs do that.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.client.vectors import ShardVectors
from distbelief.coordinator.batch import BatchPlan
from distbelief.coordinator.client import CoordinatorClient, Finished, WorkReply
from distbelief.coordinator.portions import Task
from distbelief.coordinator.protocol import (
    ACCEPTED,
    DUPLICATE,
    LOST,
    LOST_ACTION,
    STOP_ACTION,
    WORK_ACTION,
)
from distbelief.data import ArrayDataset
from distbelief.errors import (
    CoordinatorUnavailableError,
    EvaluationNotOpenError,
    VectorMissingError,
)
from distbelief.sharding import FlatLayout, tensor_specs

if TYPE_CHECKING:
    from distbelief.process import Emit, StopFlag
    from distbelief.wire.security import WireSecurity

logger = logging.getLogger(__name__)


def add_portion_gradient(
    model: nn.Module,
    dataset: ArrayDataset,
    indices: torch.Tensor,
    grads: Sequence[torch.Tensor],
    *,
    micro_batch_size: int = 256,
) -> float:
    """Add the gradient of the cross-entropy **sum** over ``dataset[indices]`` to ``grads``.

    The examples go through the model in micro-batches of ``micro_batch_size`` (cast to the
    model's dtype and moved to its device); the model's own ``.grad`` is left alone.

    Args:
        grads: One tensor per parameter of ``model``, shaped like it (views of a flat buffer).

    Returns:
        The cross-entropy sum over the examples.

    Raises:
        ValueError: ``micro_batch_size`` < 1, or ``grads`` does not match the parameters.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    params = list(model.parameters())
    if [tuple(g.shape) for g in grads] != [tuple(p.shape) for p in params]:
        raise ValueError("grads must hold one tensor shaped like each parameter of the model")
    first = params[0]
    loss_sums: list[float] = []
    for start in range(0, len(indices), micro_batch_size):
        chosen = indices[start : start + micro_batch_size]
        images = dataset.images[chosen].to(first.device, first.dtype)
        labels = dataset.labels[chosen].to(first.device)
        loss = nn.functional.cross_entropy(model(images), labels, reduction="sum")
        torch._foreach_add_(list(grads), torch.autograd.grad(loss, params))
        loss_sums.append(loss.item())
    return math.fsum(loss_sums)


@dataclass(frozen=True, kw_only=True, slots=True)
class PortionInfo:
    """One portion this worker computed (what an ``after_portion`` callback is told)."""

    evaluation: int
    portion: int
    backup: bool
    num_examples: int
    loss_sum: float
    compute_s: float


class SandblasterWorker:
    """Computes portions of Sandblaster evaluations until the coordinator says stop.

    The model must be deterministic (no dropout): a portion computed twice, by a worker and a
    backup, must give one answer.

    Args:
        model: The replica (its parameters are overwritten with each evaluation's point).
        dataset: The training set the coordinator's batch plan indexes.
        coordinator: This worker's connection to the coordinator.
        vectors: The shards' vectors (``read`` the point, ``push_bundle`` the gradients).
        portions_per_push: Push the bundle after this many accepted portions (and whenever
            there is no more work in the evaluation).
        micro_batch_size: Examples per forward/backward pass.
        max_wait_s: Longest the coordinator may hold a request for work.
        report: Called with metrics fields after each bundle (``step``: portions computed,
            ``loss``: their mean cross-entropy).
        after_portion: Called after each portion is computed, before it is reported.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: ArrayDataset,
        coordinator: CoordinatorClient,
        vectors: ShardVectors,
        *,
        portions_per_push: int = 2,
        micro_batch_size: int = 256,
        max_wait_s: float = 2.0,
        report: Callable[..., None] | None = None,
        after_portion: Callable[[PortionInfo], None] | None = None,
    ) -> None:
        if type(portions_per_push) is not int or portions_per_push < 1:
            raise ValueError(
                f"portions_per_push must be an integer >= 1, got {portions_per_push!r}"
            )
        self.model, self.dataset = model, dataset
        self.coordinator, self.vectors = coordinator, vectors
        self.portions_per_push = portions_per_push
        self.micro_batch_size, self.max_wait_s = micro_batch_size, max_wait_s
        self._report, self._after_portion = report, after_portion
        self._params = list(model.parameters())
        self.layout = FlatLayout(tensor_specs(model.named_parameters()))
        device = self._params[0].device
        self._point = self.layout.allocate()  # host: what the shards send
        self._outbox = self.layout.allocate()  # host: what goes to the shards
        self._scratch = {dtype: t.to(device) for dtype, t in self.layout.allocate().items()}
        self._bundle = {dtype: t.to(device) for dtype, t in self.layout.allocate().items()}
        self._loaded: tuple[int, str] | None = None
        self._plan: BatchPlan | None = None
        self._indices = torch.empty(0, dtype=torch.int64)
        self._bundle_evaluation: int | None = None
        self._bundle_portions: list[int] = []
        self._computed: Finished | None = None
        self._life: str | None = None
        """The coordinator life whose tasks this worker computes (and whose bundle it holds)."""
        self._window: list[float] = []
        self.figures = {"portions": 0, "accepted": 0, "duplicates": 0, "bundles": 0, "lost": 0}
        """Portions computed, accepted and refused as duplicates; bundles committed; lives lost."""

    def run(self) -> dict[str, int]:
        """Work until told to stop; returns :attr:`figures`.

        Raises:
            CoordinatorUnavailableError: the coordinator did not answer.
            ShardTimeoutError, ShardUnavailableError: a shard did not answer.
            RemoteError: a request was refused (the message says why).
            ValueError: the coordinator's batch plan does not fit the data set.
        """
        while True:
            reply = self.coordinator.ask(self._computed, self.max_wait_s)
            self._follow_life(reply.coordinator)
            self._settle(reply)
            if reply.action == LOST_ACTION:
                self._start_new_life()
                continue
            if self._bundle_portions and self._push_due(reply):
                self._push_bundle()
            if reply.action == STOP_ACTION:
                return dict(self.figures)
            if reply.action == WORK_ACTION:
                assert reply.task is not None and reply.plan is not None
                self._computed = self._compute(reply.task, reply.plan)

    def _follow_life(self, life: str | None) -> None:
        """A restarted coordinator went back to its last checkpoint: the accepted portions in
        the bundle were never its, and its evaluation numbers may name other points now."""
        if life == self._life:
            return
        if self._life is not None:
            logger.warning(
                "%s: the coordinator was restarted; dropping %d accepted portions",
                self.coordinator.worker_id,
                len(self._bundle_portions),
            )
            self._clear_bundle()
            self._loaded = None
        self._life = life

    def _settle(self, reply: WorkReply) -> None:
        """Keep the portion just computed if it was accepted, else drop it."""
        computed, self._computed = self._computed, None
        if computed is None:
            return
        if reply.finished == ACCEPTED:
            self.figures["accepted"] += 1
            torch._foreach_add_(list(self._bundle.values()), list(self._scratch.values()))
            self._bundle_evaluation = computed.evaluation
            self._bundle_portions.append(computed.portion)
        elif reply.finished == DUPLICATE:
            self.figures["duplicates"] += 1

    def _push_due(self, reply: WorkReply) -> bool:
        if reply.action != WORK_ACTION or len(self._bundle_portions) >= self.portions_per_push:
            return True
        assert reply.task is not None
        return reply.task.evaluation != self._bundle_evaluation

    def _start_new_life(self) -> None:
        logger.warning(
            "%s: declared lost; dropping %d portions and starting a new session",
            self.coordinator.worker_id,
            len(self._bundle_portions),
        )
        self.figures["lost"] += 1
        self._clear_bundle()
        self.coordinator.renew()

    def _clear_bundle(self) -> None:
        torch._foreach_zero_(list(self._bundle.values()))
        self._bundle_evaluation, self._bundle_portions = None, []

    def _push_bundle(self) -> None:
        evaluation, portions = self._bundle_evaluation, self._bundle_portions
        assert evaluation is not None
        bundle = self.coordinator.next_bundle_id()
        for dtype, tensor in self._bundle.items():
            self._outbox[dtype].copy_(tensor)
        self._clear_bundle()
        try:
            self.vectors.push_bundle(evaluation, bundle, self._outbox)
        except EvaluationNotOpenError as e:
            # Either the coordinator closed the evaluation (it answers stale), or a shard was
            # restarted and lost it while the coordinator waits for these portions: reported
            # all the same, committing the bundle fails on that shard and sends the
            # coordinator back to its last checkpoint. Dropped unreported, the portions would
            # stay finished but uncommitted and the evaluation would stall.
            logger.info("bundle %s not staged on every shard: %s", bundle, e)
        status = self.coordinator.bundle_pushed(evaluation, bundle, portions, self._life)
        if status == ACCEPTED:
            self.figures["bundles"] += 1
        elif status == LOST:
            self._start_new_life()
        else:
            logger.info("bundle %s of evaluation %d was %s", bundle, evaluation, status)
        self._emit_report()

    def _emit_report(self) -> None:
        if self._report is not None and self._window:
            self._report(
                step=self.figures["portions"], loss=math.fsum(self._window) / len(self._window)
            )
        self._window = []

    def _compute(self, task: Task, plan: BatchPlan) -> Finished:
        if plan != self._plan:
            if plan.num_examples != len(self.dataset):
                raise ValueError(
                    f"the coordinator's batch indexes {plan.num_examples} examples, but this "
                    f"worker's data set has {len(self.dataset)}"
                )
            self._plan, self._indices = plan, plan.indices()
        if self._loaded != (task.evaluation, task.point):
            whole = self._load_point(task.point)
            self._loaded = (task.evaluation, task.point) if whole else None
        start, stop = plan.portion_range(task.portion)
        started = time.perf_counter()
        torch._foreach_zero_(list(self._scratch.values()))
        loss_sum = add_portion_gradient(
            self.model,
            self.dataset,
            self._indices[start:stop],
            self.layout.views(self._scratch),
            micro_batch_size=self.micro_batch_size,
        )
        self.figures["portions"] += 1
        self._window.append(loss_sum / (stop - start))
        if self._after_portion is not None:
            self._after_portion(
                PortionInfo(
                    evaluation=task.evaluation,
                    portion=task.portion,
                    backup=task.backup,
                    num_examples=stop - start,
                    loss_sum=loss_sum,
                    compute_s=time.perf_counter() - started,
                )
            )
        return Finished(task.evaluation, task.portion, loss_sum, self._life)

    @torch.no_grad()
    def _load_point(self, point: str) -> bool:
        """Load vector ``point`` into the model; False if a shard no longer had it.

        A shard restarted since the coordinator handed out the task holds its last
        checkpoint's vectors, which may lack the point (a line search's trial). The portion is
        then computed at what the other shards sent and reported all the same: its bundle
        cannot be committed on the restarted shard, which sends the coordinator back to its
        last checkpoint. Dropped unreported, the evaluation would stall.
        """
        try:
            self.vectors.read(point, self._point)
        except VectorMissingError as e:
            logger.warning("%s: point of this portion lost: %s", self.coordinator.worker_id, e)
            whole = False
        else:
            whole = True
        torch._foreach_copy_(self._params, self.layout.views(self._point))
        return whole


def run_sandblaster_worker(
    model: nn.Module,
    dataset: ArrayDataset,
    rank: int,
    coordinator_address: str,
    shard_addresses: Sequence[str],
    *,
    emit: Emit | None = None,
    timeout_s: float = 30.0,
    retry_timeout_s: float = 60.0,
    security: WireSecurity | None = None,
    portions_per_push: int = 2,
    micro_batch_size: int = 256,
    after_portion: Callable[[PortionInfo], None] | None = None,
    stop: StopFlag | None = None,
    source_host: str | None = None,
) -> dict[str, int]:
    """Worker ``rank`` of a Sandblaster job: connect to the shards (initialising empty ones with
    ``model``'s values, as the first Downpour worker does) and the coordinator, and compute
    portions until told to stop: by the coordinator, or by ``stop`` (set once the coordinator
    has finished: a worker that missed it, starting late, say, stops waiting for it).
    ``source_host``: the address of this machine its connections to the shards and the
    coordinator leave from.

    Emits "started" (``rank``, ``time``) once connected. No "metric" records: the coordinator
    writes each worker's (its committed portions per iteration), so a worker's row has one
    meaning of ``step``.

    Returns:
        The worker's figures (see ``SandblasterWorker.figures``) and ``rank``.

    Raises:
        CoordinatorUnavailableError: the coordinator did not answer.
        ShardTimeoutError, ShardUnavailableError: a shard did not answer.
        ModelMismatchError: the shards hold another model.
        ValueError: bad arguments, or the coordinator's batch does not fit ``dataset``.
    """
    specs = tensor_specs(model.named_parameters())
    client = ParameterServerClient(
        list(shard_addresses),
        specs,
        timeout_s=timeout_s,
        retry_timeout_s=retry_timeout_s,
        security=security,
        source_host=source_host,
    )
    coordinator = CoordinatorClient(
        coordinator_address,
        f"worker{rank}",
        timeout_s=timeout_s,
        retry_timeout_s=retry_timeout_s,
        security=security,
        source_host=source_host,
    )
    finished = threading.Event()
    if stop is not None:
        threading.Thread(
            target=_close_when_stopped,
            args=(stop, finished, coordinator),
            name="stop-watch",
            daemon=True,
        ).start()
    try:
        client.handshake(FlatLayout(specs).flatten(list(model.parameters())))
        if emit is not None:
            emit("started", {"rank": rank, "time": time.time()})
        worker = SandblasterWorker(
            model,
            dataset,
            coordinator,
            ShardVectors(client),
            portions_per_push=portions_per_push,
            micro_batch_size=micro_batch_size,
            max_wait_s=min(2.0, timeout_s / 4),
            after_portion=after_portion,
        )
        try:
            figures = worker.run()
        except CoordinatorUnavailableError:
            if stop is None or not stop.is_set():
                raise
            logger.info("worker%d: the coordinator has finished; stopping", rank)
            figures = dict(worker.figures)
    except BaseException:
        client.close(wait=False)  # no waiting: the shards may be what failed
        raise
    finally:
        finished.set()
        coordinator.close()
    # Joins the client's I/O threads: a daemon thread still running while the interpreter
    # exits can abort the process.
    client.close()
    return {"rank": rank, **figures}


def _close_when_stopped(
    stop: StopFlag, finished: threading.Event, coordinator: CoordinatorClient
) -> None:
    """Ends the coordinator client's retries once ``stop`` is set (until ``finished``)."""
    while not finished.is_set():
        if stop.wait(0.2):
            coordinator.close()
            return
