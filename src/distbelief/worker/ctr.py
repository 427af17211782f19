"""A worker for click logs: a DLRM replica whose embedding tables live by row on the shards.

The dense layers train with DownpourSGD as any model's do; the tables' rows are fetched for
each batch's ids (every table in one request per shard) and their gradients pushed by
``ShardedEmbeddings``. The worker never holds a whole table: only the batch's rows and its row
cache. Records add the window's click AUC and the rows pulled and pushed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.client.rows import RowClient
from distbelief.config import max_table_rows, unknown_table_problem
from distbelief.data import load_job_dataset, worker_indices
from distbelief.data.ctr import CtrDataset
from distbelief.data.files import DEFAULT_DATA_DIR
from distbelief.data.loading import table_size_source
from distbelief.data.movielens import check_movielens_split
from distbelief.embeddings import ShardedEmbeddings
from distbelief.errors import (
    ModelMismatchError,
    TableSizeMismatchError,
    TableWidthMismatchError,
)
from distbelief.models.dlrm import DLRM
from distbelief.optim import DownpourSGD
from distbelief.process import Emit
from distbelief.sharding import tensor_specs
from distbelief.telemetry.auc import roc_auc
from distbelief.telemetry.metrics import make_record
from distbelief.worker.hooks import StepHook, after_step
from distbelief.worker.loop import worker_batches

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity

CtrBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def build_ctr_replica(config: JobConfig, dataset: CtrDataset) -> nn.Module:
    """The job's DLRM for ``dataset``'s features, its tables on the meta device (their rows are
    the shards'; with ``--tables``, the tables not named are dense parameters, built for real),
    its dense layers initialised from ``config.model.seed``.

    Raises:
        ValueError: ``--tables`` names a module the model does not have, or a table is larger
            than torch sizes a tensor to (a MovieLens id too large: named by file and line).
    """
    if config.data.name == "movielens" and max(dataset.table_sizes) > max_table_rows(
        config.model.embedding_dim
    ):
        # As the launcher's check says it (``distbelief worker`` and ``eval`` have none): the
        # file's line that holds the id, found only now that it is there.
        data_dir = config.data.data_dir or DEFAULT_DATA_DIR
        check_movielens_split("train", data_dir, embedding_dim=config.model.embedding_dim)
    names = config.embeddings.tables
    sharded = [f"tables.{t}" for t in range(dataset.num_tables)]
    # The command line checks the names against the data set's table count before anything
    # starts; this is for a data set of another shape, given here.
    problem = unknown_table_problem(names, config.data.name, dataset.num_tables)
    if problem is not None:
        raise ValueError(f"--tables: {problem}")
    torch.manual_seed(config.model.seed)
    return DLRM(
        dataset.num_dense,
        dataset.table_sizes,
        embedding_dim=config.model.embedding_dim,
        embedding_device="meta",
        real_tables=[
            t for t, name in enumerate(sharded) if names is not None and name not in names
        ],
    )


def job_tables(
    config: JobConfig,
    model: nn.Module,
    addresses: Sequence[str],
    security: WireSecurity | None,
    *,
    worker_id: str | None = None,
    cache: bool = True,
    source_host: str | None = None,
    on_push_applied: Callable[[int], None] | None = None,
) -> ShardedEmbeddings:
    """The job's tables of ``model`` on the shards (swapped in place), with its pull period,
    push period, row cache (``cache``: a reader that never steps must not cache, or its rows
    would never age) and timeouts; ``source_host``: the local address the connections leave
    from; ``on_push_applied`` as ``ShardedEmbeddings``'.

    Raises:
        TableSizeMismatchError: the shards hold a table of another size, with where this
            process's size came from (``table_size_source``).
        TableWidthMismatchError: the shards hold a table of rows of another width, with the
            flag this process's width came from.
    """
    try:
        return ShardedEmbeddings(
            model,
            ps=list(addresses),
            tables=config.embeddings.tables,
            lr=config.optimizer.lr,
            n_push=config.optimizer.n_push,
            n_pull=config.optimizer.n_pull,
            row_cache_mb=config.embeddings.row_cache_mb if cache else 0.0,
            blocking=config.optimizer.blocking,
            timeout_s=config.faults.timeout_s,
            retry_timeout_s=config.faults.retry_timeout_s,
            worker_id=worker_id,
            security=security,
            source_host=source_host,
            on_push_applied=on_push_applied,
        )
    except TableSizeMismatchError as e:  # the shard cannot know where this size came from
        raise TableSizeMismatchError(f"{e}: {table_size_source(config.data)}") from None
    except TableWidthMismatchError as e:  # a dlrm table's row width is the model's width
        raise TableWidthMismatchError(f"{e}: give the job's --embedding-dim") from None


def check_dense_parameters(
    config: JobConfig,
    model: nn.Module,
    addresses: Sequence[str],
    security: WireSecurity | None,
    source_host: str | None = None,
) -> None:
    """Check that the shards hold ``model``'s dense parameters (its tables' weights, on the
    meta device, are left out), or none yet, changing nothing on them: declaring the tables
    makes them on every shard, where shards of another job would keep them and save them
    into that job's checkpoints.

    Raises:
        TableWidthMismatchError / TableSizeMismatchError: the shards hold the dense
            parameters of this model's job built with other flags (and all its tables): the
            tables' own refusal names the flag (``--embedding-dim``, ``--table-size``).
        ModelMismatchError: the shards hold another model's parameters.
        ShardTimeoutError, ShardUnavailableError: a shard did not answer.
    """
    named = list(model.named_parameters())
    client = ParameterServerClient(
        list(addresses),
        tensor_specs([(name, p) for name, p in named if not p.is_meta]),
        timeout_s=config.faults.timeout_s,
        retry_timeout_s=config.faults.retry_timeout_s,
        security=security,
        source_host=source_host,
    )
    try:
        client.check_shards()
    except ModelMismatchError:
        _refuse_by_tables(config, model, addresses, security, named)
        raise
    finally:
        client.close()


def _refuse_by_tables(config, model, addresses, security, named) -> None:
    """Where the shards hold every table of ``model``, the tables' own refusal (declaring
    them then makes none); elsewhere nothing, and no table is declared."""
    # A table's weight is on the meta device: its rows are the shards'.
    widths = {n.removesuffix(".weight"): p.shape[1] for n, p in named if p.is_meta}
    reader = RowClient(
        list(addresses),
        widths,
        timeout_s=config.faults.timeout_s,
        retry_timeout_s=config.faults.retry_timeout_s,
        security=security,
    )
    try:
        held = {name for shard in reader.stats() for name in shard.get("tables", {})}
    finally:
        reader.close()
    if set(widths) <= held:
        job_tables(config, model, addresses, security, cache=False).client.close()


class BothPushed:
    """Tells ``report`` (``push_reporter``'s) the step of a click worker's last push whose
    dense and row parts every shard has applied: where its next life goes on, each step's
    rows applied once. The two optimizers push apart and tell ``dense`` and ``rows``."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self._report = report
        self._steps = {"dense": 0, "rows": 0}
        self._reported = 0

    def start(self, dense_step: int, rows_step: int) -> None:
        """The steps each part's shards hold already when training (re)starts."""
        self._steps = {"dense": dense_step, "rows": rows_step}
        self._reported = min(dense_step, rows_step)

    def dense(self, step: int) -> None:
        self._note("dense", step)

    def rows(self, step: int) -> None:
        self._note("rows", step)

    def _note(self, part: str, step: int) -> None:
        self._steps[part] = step
        both = min(self._steps.values())
        if both > self._reported:
            self._reported = both
            self._report(both)


def table_columns(tables: ShardedEmbeddings) -> dict[str, int]:
    """Sharded table name -> the sparse column it reads (DLRM's ``tables.T`` reads column T)."""
    return {name: int(name.rpartition(".")[2]) for name in tables.modules}


def window_auc(scores: list[torch.Tensor], labels: list[torch.Tensor]) -> float | None:
    """The AUC of a window's scores (None when the window holds one class only)."""
    try:
        return roc_auc(torch.cat(scores), torch.cat(labels))
    except ValueError:
        return None


def ctr_train_loop(
    model: nn.Module,
    optimizer: DownpourSGD,
    tables: ShardedEmbeddings,
    batches: Iterable[CtrBatch],
    *,
    log_every_steps: int,
    report: Callable[..., None],
    hooks: Sequence[StepHook] = (),
) -> int:
    """Forward, backward, step (dense and tables) for each batch, the next batch's rows
    fetched meanwhile (``ShardedEmbeddings.prefetch_next``); every
    ``log_every_steps`` steps (and at the last step, after a flush of the pushes, for a shorter
    last window) ``report(**fields)`` with the window's loss, accuracy (at 0.5), AUC, staleness,
    wire figures and rows moved; after each step (before its report) every hook's
    ``after_step``.

    Returns:
        The optimizer's step count when the batches ran out or a hook stopped the loop.
    """
    columns = table_columns(tables)
    window_loss, window_correct, window_seen = 0.0, 0, 0
    window_scores: list[torch.Tensor] = []
    window_labels: list[torch.Tensor] = []

    def table_ids(sparse: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: sparse[:, column] for name, column in columns.items()}

    def report_window() -> None:
        staleness = optimizer.client.take_staleness()
        wire = optimizer.client.take_wire_figures()
        rows_wire = tables.client.take_wire_figures()
        figures = tables.take_figures()
        report(
            step=optimizer.num_steps,
            loss=window_loss / window_seen,
            accuracy=window_correct / window_seen,
            auc=window_auc(window_scores, window_labels),
            version=optimizer.version,
            staleness=sum(staleness) / len(staleness) if staleness else None,
            bytes_pushed=wire["bytes_pushed"] + rows_wire["bytes_pushed"],
            bytes_pulled=wire["bytes_pulled"] + rows_wire["bytes_pulled"],
            latency_p50_ms=wire["latency_p50_ms"],
            latency_p99_ms=wire["latency_p99_ms"],
            rows_pulled=figures["rows_pulled"],
            rows_pushed=figures["rows_pushed"],
        )

    upcoming = iter(batches)
    batch = next(upcoming, None)
    if batch is not None:
        tables.prefetch(table_ids(batch[1]))
    while batch is not None:
        dense, sparse, labels = batch
        started = time.perf_counter()
        batch = next(upcoming, None)
        if batch is not None:
            # The next batch's rows travel while this one computes.
            tables.prefetch_next(table_ids(batch[1]))
        optimizer.zero_grad()
        logits = model(dense, sparse)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        optimizer.step()
        tables.step()
        loss_value = loss.item()
        compute_s = time.perf_counter() - started
        scores = logits.detach()
        window_loss += loss_value * len(labels)
        window_correct += int(((scores > 0).float() == labels).sum())
        window_seen += len(labels)
        window_scores.append(scores)
        window_labels.append(labels)
        if after_step(
            hooks,
            step=optimizer.num_steps,
            loss=loss_value,
            batch_size=len(labels),
            compute_s=compute_s,
        ):
            batch = None
        if batch is None:
            # The last step: its pushes, and close()'s of what is left, leave before the last
            # report, so the records count every byte the worker pushed.
            optimizer.flush()
            tables.flush()
        if batch is None or optimizer.num_steps % log_every_steps == 0:
            report_window()  # the last steps, short of a whole window or not, are on record
            window_loss, window_correct, window_seen = 0.0, 0, 0
            window_scores, window_labels = [], []
    return optimizer.num_steps


def run_ctr_worker(
    config: JobConfig,
    rank: int,
    addresses: Sequence[str],
    *,
    emit: Emit,
    hooks: Sequence[StepHook] = (),
    start_time: float = 0.0,
    security: WireSecurity | None = None,
    resume_step: int = 0,
    restarted: bool = False,
) -> dict:
    """``run_worker`` for a click-log job: replica ``rank`` trained on its slice of the log.

    Raises:
        ShardTimeoutError, ShardUnavailableError: a shard did not answer.
        ModelMismatchError: the shards hold another model's parameters or tables.
    """
    from distbelief.worker.run import push_reporter, start_training  # run.py dispatches here

    torch.set_num_threads(config.cluster.threads_per_worker)
    train_set = load_job_dataset(config.data, "train")
    indices = worker_indices(
        len(train_set), rank, config.cluster.num_workers, seed=config.model.seed
    )
    model = build_ctr_replica(config, train_set)
    source_host = config.cluster.worker_host or None
    # Declaring the tables makes them on every shard: shards of another job, which refuse
    # the dense parameters below, would keep them and save them into that job's checkpoints.
    check_dense_parameters(config, model, addresses, security, source_host)
    pushed = BothPushed(push_reporter(emit, rank))
    tables = job_tables(
        config,
        model,
        addresses,
        security,
        worker_id=f"worker{rank}",
        source_host=source_host,
        on_push_applied=pushed.rows,
    )
    rows_pushed = tables.client.pushed_steps if restarted else None
    try:
        optimizer, resume_step = start_training(
            config,
            rank,
            model,
            addresses,
            security,
            emit,
            resume_step=resume_step,
            restarted=restarted,
            on_push_applied=pushed.dense,
            rows_pushed=rows_pushed,
        )
    except BaseException:
        tables.client.close(wait=False)
        raise
    # The shards hold each step's rows once: none holding a step is sent it again.
    tables.resume(resume_step, rows_pushed)
    pushed.start(optimizer.applied_step, tables.applied_step)
    try:
        ctr_train_loop(
            model,
            optimizer,
            tables,
            worker_batches(config, train_set, indices, resume_step),
            log_every_steps=config.reporting.log_every_steps,
            report=lambda **fields: emit(
                "metric", make_record("worker", rank, time_s=time.time() - start_time, **fields)
            ),
            hooks=hooks,
        )
        optimizer.close()
        tables.close()
    except BaseException:
        optimizer.client.close(wait=False)
        tables.client.close(wait=False)
        raise
    return {"rank": rank, "steps": optimizer.num_steps}
