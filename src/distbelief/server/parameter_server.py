"""ParameterServer: the seed's API, one shard served by one rank of a torch.distributed job.

Serves with ``serve_shard``, publishes its address and a fresh job key in the process group's
store, and stops once every other rank has closed its ``DownpourSGD`` or is gone
(``server/rank_watch.py``). It owns no shard logic.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading

import torch
from torch import nn

from distbelief.config import (
    MAX_RATE,
    MAX_WAIT_S,
    ConsistencyConfig,
    amount_problem,
)
from distbelief.errors import ClosedError, DistBeliefError
from distbelief.hosts import check_local_host, is_host
from distbelief.optim.param_checks import rate_value
from distbelief.server.optimizers import server_optimizer_factory
from distbelief.server.process import serve_shard
from distbelief.server.rank_watch import RankWatch
from distbelief.server.shard import ParameterShard
from distbelief.sharding import FlatLayout, describe_misfit, matched_to_model, tensor_specs
from distbelief.wire.process_group import DEFAULT_STORE_TIMEOUT_S, GroupStore, ServerRecord
from distbelief.wire.security import WireSecurity, generate_key

logger = logging.getLogger(__name__)

DEFAULT_JOIN_TIMEOUT_S = 300.0
"""How long a rank may take to connect: as long as its DownpourSGD waits for the server to
publish its address (``hold_timeout_s``)."""


def _check_host(host: object) -> None:
    """Refuses a ``host`` that is not this machine's address (or a name of it): the server binds
    it at ``run()``, and ``tcp://``, a port or an address of another machine would fail only
    there, as an address the user never typed."""
    if host is None:
        return
    if not isinstance(host, str):
        raise TypeError(f"host must be a str (or None), got {type(host).__name__}")
    if not is_host(host):
        raise ValueError(
            f"host must be an IP address or host name of this machine, without scheme or port, "
            f"got {host!r}"
        )
    try:
        check_local_host(host)
    except ValueError as e:
        raise ValueError(f"host {e}") from None


def _check_arguments(model, lr, consistency, port, timeout_s, join_timeout_s) -> None:
    """The constructor's arguments, named, before anything is joined or started."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if next(iter(model.parameters()), None) is None:
        # Its parameters are what run() fills in at the end: a model without any would have
        # the workers train a whole job for nothing to be loaded into it.
        raise ValueError(
            f"model has no parameters ({type(model).__name__}): give ParameterServer the model "
            "the workers train"
        )
    for name, param in model.named_parameters():
        if param.is_meta:  # run() would load nothing into it, and say nothing
            raise ValueError(
                f"model parameter {name!r} is on the meta device: it can take no parameters "
                "(materialise the model, e.g. with to_empty(), first)"
            )
    problem = None if lr is None else amount_problem(rate_value(lr), zero_ok=True, most=MAX_RATE)
    if problem is not None:
        raise ValueError(f"lr {problem} (or None), got {lr!r}")
    if consistency is not None and not isinstance(consistency, ConsistencyConfig):
        raise TypeError(
            f"consistency must be a ConsistencyConfig, got {type(consistency).__name__}"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}")
    for name, value in (("timeout_s", timeout_s), ("join_timeout_s", join_timeout_s)):
        problem = amount_problem(value, most=MAX_WAIT_S)
        if problem is not None:
            raise ValueError(f"{name} {problem}, got {value!r}")


class ParameterServer:
    """Serve a model's parameters to the other ranks of the default process group.

    Every process calls ``torch.distributed.init_process_group(...)`` first; this rank then
    runs ``ParameterServer(model).run()`` and every other rank trains with
    ``DownpourSGD(net.parameters(), lr=..., n_push=..., n_pull=..., model=net)``, given no
    address: it reads the server's address and job key from the process group's store.

    The process group's store is the trust boundary: the job key that authenticates every
    push and pull is published there in the clear, so whoever can reach the store (the
    ``init_method`` address) can join the job. Keep that address on a trusted network.

    Args:
        model: The model the workers train. The first worker to connect sets the initial
            parameters (as in ``distbelief train``); once ``run()`` returns, ``model`` holds
            the server's final parameters (those the workers trained: matched by name, or by
            position where the workers gave DownpourSGD no names of ``model``'s; the rest
            stay as they were). A worker whose parameters do not fit it so is refused as it
            joins with ``ModelMismatchError``.
        lr: The server's own learning rate for plain SGD on the pushed gradients: a finite
            number >= 0 (numpy's too, or a one-element tensor, as DownpourSGD's). None (the
            seed's behaviour): each push is applied at the pushing worker's current rate, so
            a worker's LR scheduler steers the server too.
        consistency: Async (default), SSP or synchronous rounds, as for ``distbelief ps``;
            a synchronous round waits for a gradient of every other rank of the group (less
            ``backup_workers``).
        host: The address the other ranks reach this server at (bound with a free port).
            Default: the store's host when this rank serves the store (rank 0), else this
            machine's host name.
        port: Port to listen on; 0 picks a free one.
        timeout_s: Limit of each operation on the process group's store.
        join_timeout_s: How long a rank may take to connect (from the start, or from when it
            looked this server up) before it counts as lost.

    A rank is lost when it never connected within ``join_timeout_s``, or when every
    connection of its DownpourSGD has been closed for longer than the liveness timeout of
    ``consistency`` (10 s by default; a worker whose connection broke reconnects well within
    it) without it finishing: killed, say. ``run()`` then ends once every other rank has
    finished or is lost, with a warning naming each lost rank.

    Raises:
        TypeError: ``model`` is no ``torch.nn.Module``, ``consistency`` no
            ``ConsistencyConfig``, or ``host`` no str.
        ValueError: ``model`` has no parameters; ``lr``, ``port``, ``timeout_s`` or
            ``join_timeout_s`` out of range (named); ``host`` no address or name of this
            machine (``tcp://`` or a port with it, say);
            no process group is initialised, or it has no rank besides this one; or
            ``consistency.backup_workers`` not below the number of other ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        *,
        consistency: ConsistencyConfig | None = None,
        host: str | None = None,
        port: int = 0,
        timeout_s: float = DEFAULT_STORE_TIMEOUT_S,
        join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
    ) -> None:
        _check_arguments(model, lr, consistency, port, timeout_s, join_timeout_s)
        _check_host(host)
        self._store = GroupStore(timeout_s)
        if self._store.world_size < 2:
            raise ValueError(
                "ParameterServer needs a process group with world_size >= 2 (this rank serves, "
                f"the others train), got world_size={self._store.world_size}"
            )
        consistency = consistency or ConsistencyConfig()
        if lr is None:
            consistency = dataclasses.replace(consistency, apply_worker_lr=True)
        self.model = model
        self.consistency = consistency
        # A rate as DownpourSGD takes one (numpy's, a one-element tensor), as a float.
        rate = 1.0 if lr is None else float(rate_value(lr))
        self._optimizer_factory = server_optimizer_factory("sgd", lr=rate)
        host = host or self._store.store_host() or socket.gethostname()
        self.bind = f"tcp://{host}:{port}"
        self.security = WireSecurity(auth_key=generate_key())
        self.worker_ranks = [r for r in range(self._store.world_size) if r != self._store.rank]
        # Every other rank trains: a synchronous round waits for each one's gradient.
        if not consistency.backup_workers < len(self.worker_ranks):
            raise ValueError(
                f"consistency.backup_workers must be < the number of training ranks "
                f"({len(self.worker_ranks)}), got {consistency.backup_workers}"
            )
        self.join_timeout_s = join_timeout_s
        self._record: ServerRecord | None = None
        self._watch: RankWatch | None = None
        self._stop = threading.Event()
        self._every_rank_done = False
        """Whether the server stopped because every other rank finished or is lost (not by
        ``stop()``)."""
        self._run_lock = threading.Lock()
        self._ran = False

    def run(self) -> dict:
        """Serve until every other rank has finished (closed its DownpourSGD) or is lost,
        ``stop()``, or Ctrl-C.

        Returns:
            The shard's counters and staleness histogram, as ``serve_shard`` reports them,
            ``"finished"`` (True: every rank finished; False after ``stop()`` while some had
            not) and ``"lost_ranks"`` (those lost, in order); after Ctrl-C only ``"version"``,
            ``"finished": False`` and ``"lost_ranks"`` (and ``model`` is left as it was).

        Raises:
            RendezvousError: the process group's store could not be written or read.
            BindError: the address could not be bound (a ShardUnavailableError).
            ClosedError: ``run()`` was called before on this server, however it ended (one
                that raised ``BindError`` included: the address is fixed): make a new
                ``ParameterServer``.
        """
        with self._run_lock:
            if self._ran:
                raise ClosedError("ParameterServer", "run()", after="its first run()")
            self._ran = True
        num_workers = len(self.worker_ranks)
        shard = ParameterShard(
            0,
            1,
            self._optimizer_factory,
            self.consistency,
            num_workers=num_workers,
            # A rank training another model is refused as it joins, not trained for nothing.
            model_specs=tensor_specs(self.model.named_parameters()),
        )
        self._shard = shard
        try:
            summary = serve_shard(
                0,
                1,
                self.bind,
                optimizer_factory=self._optimizer_factory,
                consistency=self.consistency,
                num_workers=num_workers,
                security=self.security,
                emit=self._on_event,
                stop=self._stop,
                shard=shard,
            )
        except KeyboardInterrupt:
            logger.warning("parameter server interrupted before every rank finished")
            return {"version": shard.version, "finished": False, "lost_ranks": self._lost()}
        finally:
            self._withdraw()
        self._load_final_parameters(shard)
        lost = self._lost()
        return {**summary, "finished": self._every_rank_done and not lost, "lost_ranks": lost}

    def _withdraw(self) -> None:
        """Its address out of the store, as it stops serving (a ParameterServer made next in
        this group is the one a later DownpourSGD must find); a store already gone (the
        group destroyed) has nothing to withdraw from."""
        if self._record is None:
            return
        try:
            self._store.withdraw_server(self._record)
        except DistBeliefError as e:
            logger.debug("could not withdraw the server's address: %s", e)

    def stop(self) -> None:
        """End ``run()`` from another thread (a watchdog, a handler of your own) before every
        rank has finished: the server stops serving within about a second, ``model`` gets
        the parameters it holds then, and ``run()`` returns (``"finished"``: False unless
        every rank had finished). Ranks still training find the server gone. Called again, it
        does nothing."""
        self._stop.set()

    def _lost(self) -> list[int]:
        return [] if self._watch is None else sorted(self._watch.lost)

    def _on_event(self, kind: str, payload: object) -> None:
        # Runs on serve_shard's loop: "ready" once listening, then a heartbeat 4x a second.
        if kind == "ready":
            assert isinstance(payload, dict)
            self._record = self._store.publish_server(payload["address"], self.security.auth_key)
            self._watch = RankWatch(
                self.worker_ranks,
                self._shard.presence,
                grace_s=self.consistency.liveness_timeout_s,
                join_timeout_s=self.join_timeout_s,
            )
            logger.info(
                "parameter server (rank %d) at %s; waiting for ranks %s",
                self._store.rank,
                payload["address"],
                self.worker_ranks,
            )
        elif kind == "heartbeat" and self._record is not None and not self._stop.is_set():
            self._stop_once_every_rank_is_done(self._record.session)

    def _stop_once_every_rank_is_done(self, session: str) -> None:
        """Stop when every rank has finished or is lost (each lost one named once)."""
        assert self._watch is not None
        unfinished = self._store.unfinished_ranks(session, self.worker_ranks)
        workers = self._store.worker_ids(session, unfinished) if unfinished else {}
        for rank, reason in self._watch.update(unfinished, workers).items():
            logger.warning("rank %d %s", rank, reason)
            self._store.release_rank(session, rank)
        if not unfinished:
            logger.info("every rank finished: stopping the parameter server")
        elif set(unfinished) == set(self._watch.lost):
            logger.warning(
                "every other rank finished or is lost (ranks %s): stopping the parameter server",
                sorted(self._watch.lost),
            )
        else:
            return
        self._every_rank_done = True
        self._stop.set()

    def _load_final_parameters(self, shard: ParameterShard) -> None:
        """Copy the shard's parameters into ``model`` (if a worker initialised it): by name, or
        by position where the workers gave their tensors no names of ``model``'s (a DownpourSGD
        without ``model=`` names them param.<i>), as the handshake matched them."""
        if not shard.initialized:
            logger.warning("no worker initialised the parameter server: the model is unchanged")
            return
        # Named as the workers name them: a compiled model's names without its wrapper's prefix.
        own_specs = tensor_specs(self.model.named_parameters())
        misfit = describe_misfit(own_specs, shard.specs)
        if misfit is not None:  # its parameters were replaced since the handshake checked them
            logger.warning("final parameters not loaded into the model: %s", misfit)
            return
        params = list(self.model.parameters())
        positions = matched_to_model(own_specs, shard.specs)
        assert positions is not None  # it fits
        targets = [params[at] for at in positions]
        flats = dict(zip([piece.dtype for piece in shard.slices], shard.parameters(), strict=True))
        with torch.no_grad():
            torch._foreach_copy_(targets, FlatLayout(shard.specs).views(flats))
