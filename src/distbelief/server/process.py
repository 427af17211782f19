"""A shard's process function: restore, serve, checkpoint, heartbeat, until told to stop.

Run by the launcher's children, by ``distbelief ps`` and by ``ParameterServer``; it reports
through ``emit`` and knows nothing of who started it.
"""

from __future__ import annotations

import logging
import threading

import torch

from distbelief.config import ConsistencyConfig, JobConfig
from distbelief.deferred_signals import signals_deferred
from distbelief.process import Emit, StopFlag
from distbelief.server.groups import ShardGroups
from distbelief.server.optimizers import ServerOptimizerFactory, server_optimizer_from_config
from distbelief.server.row_persistence import restore_row_tables, row_checkpointer
from distbelief.server.row_tables import RowTableSettings, ShardTables
from distbelief.server.service import ShardService
from distbelief.server.shard import ParameterShard
from distbelief.sharding import Partitioner
from distbelief.wire import serve
from distbelief.wire.security import WireSecurity

logger = logging.getLogger(__name__)

_HEARTBEAT_S = 0.25


def serve_shard(
    shard_id: int,
    num_shards: int,
    bind: str,
    *,
    optimizer_factory: ServerOptimizerFactory,
    consistency: ConsistencyConfig | None = None,
    num_workers: int = 1,
    security: WireSecurity | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every_s: float | None = 30.0,
    restore_from: str | None = None,
    partitioner: Partitioner | None = None,
    emit: Emit,
    stop: StopFlag | None = None,
    shard: ParameterShard | None = None,
    row_settings: RowTableSettings | None = None,
    design: str = "pool",
    max_connections: int | None = 4096,
) -> dict:
    """Serve one shard at ``bind`` until ``stop`` is set (or forever, or SIGTERM).

    With ``checkpoint_dir`` the shard first restores its last checkpoint from there (if any),
    saves every ``checkpoint_every_s`` seconds and once more on the way out, and saves into
    ``checkpoint_dir/TAG/`` when a vector program asks for checkpoint TAG.
    ``checkpoint_every_s`` None: no saves but those (Sandblaster's coordinator decides when
    every shard is at the same point), and ``restore_from`` names the folder to restore from
    (default: ``checkpoint_dir``). A synchronous
    round expects ``num_workers`` gradients. ``partitioner``: which slices the shard owns
    (default: flat); its clients must use an equal one. Clients that name a parameter group
    (a model-parallel partition's) get a shard of their own for it, built from the same
    arguments and checkpointed into ``checkpoint_dir/group-NAME/`` (``server/groups.py``).
    Embedding tables are restored and saved with the dense parameters, in their own files
    (``server/row_persistence.py``).
    Emits "ready" once listening and, every quarter second, a "heartbeat": what it would return
    if stopped then, less its address (a launcher that loses the shard, or stops before it
    returns, still knows its counters, staleness and workers' hosts so far).
    ``row_settings``: how the shard makes the embedding tables its clients declare (row
    optimizer, admission, eviction; ``server/row_tables.py``); default: plain SGD rows.
    ``shard``: an empty shard the caller built from the same arguments and keeps a handle on
    (to read its parameters after the stop); default: a new one.
    ``design``: how connections are served (``"pool"`` or ``"threads"``,
    ``wire/rpc_server.py``); ``max_connections``: connections served at once, past which new
    ones are refused (None: no cap).

    Returns:
        Its address, counters and staleness histogram, what its clients replayed into it, and
        the host each worker connected from.

    Raises:
        CheckpointError: the checkpoint to restore is corrupt or belongs to another shard.
    """
    stop = stop if stop is not None else threading.Event()
    # A factory's first optimizer may import torch._dynamo (torch.optim's own classes do; the
    # shard's built-in ones do not): seconds on a busy machine. Paid here, before "ready", it
    # cannot push the first worker's INIT past its request timeout.
    optimizer_factory([torch.zeros(1)])

    def make_shard() -> ParameterShard:
        return ParameterShard(
            shard_id,
            num_shards,
            optimizer_factory,
            consistency,
            partitioner=partitioner,
            num_workers=num_workers,
        )

    shard = shard if shard is not None else make_shard()
    # Parameter groups (a model-parallel partition's) get shards of their own, made alike.
    groups = ShardGroups(
        shard,
        make_shard,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_s=checkpoint_every_s,
    )
    restored = groups.restore(restore_from if restore_from is not None else checkpoint_dir)
    groups.start_checkpoints(restored)
    tables = ShardTables(shard_id, num_shards, row_settings or RowTableSettings())
    restore_row_tables(tables, restore_from if restore_from is not None else checkpoint_dir)
    row_saver = None
    if checkpoint_dir is not None and checkpoint_every_s is not None:
        row_saver = row_checkpointer(tables, checkpoint_dir, checkpoint_every_s).start()
    service = ShardService(shard, checkpoint_dir=checkpoint_dir, groups=groups, tables=tables)

    def stop_saving() -> None:
        groups.stop_checkpoints()
        if row_saver is not None:
            row_saver.stop()

    try:
        server = serve(
            bind, service, security=security, design=design, max_connections=max_connections
        )
    except BaseException:
        stop_saving()
        raise
    restored_version = sum(restored.values()) if restored else None
    emit(
        "ready",
        {"shard_id": shard_id, "address": server.address, "restored_version": restored_version},
    )
    logger.info("shard %d of %d serving at %s", shard_id, num_shards, server.address)

    def report() -> dict:
        """What the shard has done so far: each heartbeat's payload, and its result's."""
        totals = groups.totals()
        return {
            "shard_id": shard_id,
            "worker_hosts": dict(service.worker_hosts),
            "version": totals["version"],
            "num_pushes": totals["num_pushes"],
            "num_dropped": totals["num_dropped"],
            "staleness": totals["staleness"],
            **groups.recovery(),
        }

    try:
        # Short waits, not one long one, so SIGTERM's SystemExit is raised promptly.
        while not stop.wait(_HEARTBEAT_S):
            emit("heartbeat", report())
    finally:
        # A second Ctrl-C or SIGTERM while stopping (pressed again, or a service manager's after
        # it) is acted on once the last checkpoint is saved, not in the middle of it.
        with signals_deferred():
            server.stop()
            stop_saving()
    return {"shard_id": shard_id, "address": server.address, **report()}


def serve_job_shard(
    config: JobConfig,
    shard_id: int,
    bind: str,
    *,
    security: WireSecurity | None,
    checkpoint_dir: str | None,
    restore_from: str | None = None,
    emit: Emit,
    stop: StopFlag | None = None,
) -> dict:
    """``serve_shard`` for shard ``shard_id`` of the job ``config`` describes (its server,
    consistency and cluster sections): what the launcher's shards and ``distbelief ps`` run.
    ``restore_from``: the folder to restore from, if not ``checkpoint_dir``. Sets this
    process's torch threads to the server section's."""
    torch.set_num_threads(config.server.threads)
    return serve_shard(
        shard_id,
        config.cluster.num_shards,
        bind,
        optimizer_factory=server_optimizer_from_config(config.server),
        consistency=config.consistency,
        num_workers=config.cluster.num_workers,
        security=security,
        checkpoint_dir=checkpoint_dir,
        # Sandblaster's shards save when the coordinator says (all at the same iteration).
        checkpoint_every_s=None
        if config.optimizer.algorithm == "sandblaster"
        else config.server.checkpoint_every_s,
        restore_from=restore_from,
        emit=emit,
        stop=stop,
        row_settings=row_settings_from_config(config),
        design=config.server.design,
        max_connections=config.server.max_connections,
    )


def row_settings_from_config(config: JobConfig) -> RowTableSettings:
    """The embedding tables' settings of the job ``config`` describes (its embeddings
    section; the row seed is the model's)."""
    embeddings = config.embeddings
    return RowTableSettings(
        optimizer=embeddings.row_optimizer,
        lr=embeddings.row_lr,
        admit_after=embeddings.admit_after,
        max_rows=embeddings.max_rows_per_shard,
        ttl_steps=embeddings.row_ttl_steps,
        init_std=embeddings.row_init_std,
        seed=config.model.seed,
    )
