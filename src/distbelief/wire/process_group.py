"""The parameter server's rendezvous in a torch.distributed process group: its address and job
key published in the default group's store, which process holds each rank, each rank's worker
id, and which ranks have finished training.

The one module that touches torch.distributed; it reads and writes only keys under
``distbelief/`` and never runs a collective, so it cannot deadlock the user's own collectives.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from distbelief.errors import RendezvousError

logger = logging.getLogger(__name__)

_SERVER_KEY = "distbelief/server"
_FINISHED_PREFIX = "distbelief/finished"
_WORKER_PREFIX = "distbelief/worker"
_HOLDER_PREFIX = "distbelief/holder"
_PROCESS_TOKEN = secrets.token_hex(4)
"""With the host and pid, names this process as a rank's holder: two containers that share a
host name can each run their script as pid 1."""
_POLL_S = 0.1
_SAY_WAITING_AFTER_S = 10.0
"""A wait for the server's address this long says what it waits for (the default wait is
minutes, in silence a script looked hung)."""
DEFAULT_STORE_TIMEOUT_S = 30.0
"""Limit of each store operation on distbelief's own connection to the store."""


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """What a ``ParameterServer`` publishes for the other ranks."""

    address: str
    auth_key: bytes
    rank: int
    session: str
    """Names this server's life: ranks mark themselves finished for this session only."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "address": self.address,
                "auth_key": self.auth_key.hex(),
                "rank": self.rank,
                "session": self.session,
            }
        )

    @staticmethod
    def from_json(text: str) -> ServerRecord:
        raw = json.loads(text)
        return ServerRecord(
            raw["address"], bytes.fromhex(raw["auth_key"]), raw["rank"], raw["session"]
        )


def process_group_active() -> bool:
    """True when this process has called ``torch.distributed.init_process_group``."""
    return dist.is_available() and dist.is_initialized()


def _clone_within(store: dist.Store, timeout_s: float) -> dist.Store:
    """A new connection to ``store``, made within ``timeout_s``.

    A clone connects with the group's own timeout (30 minutes by default): with the rank that
    serves the store gone, it would wait that long. It runs on a daemon thread instead, which
    is left behind to give up in its own time.

    Raises:
        RendezvousError: the store did not take the connection within ``timeout_s``.
    """
    made: list = []

    def clone() -> None:
        try:
            made.append(store.clone())
        except RuntimeError as e:  # the store's connection errors
            made.append(e)

    thread = threading.Thread(target=clone, name="distbelief-store-clone", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not made:
        raise RendezvousError(
            f"process group store: no connection within {timeout_s:g}s (is the rank that "
            "serves it, rank 0 under tcp:// and env:// initialisation, gone?)"
        )
    if isinstance(made[0], RuntimeError):
        raise RendezvousError(f"process group store: connecting failed: {made[0]}") from made[0]
    return made[0]


class GroupStore:
    """distbelief's keys in the default process group's store, on a connection of its own.

    Args:
        timeout_s: Limit of each store operation (the group's own timeout is left alone).

    Raises:
        ValueError: no default process group has been initialised.
    """

    def __init__(self, timeout_s: float = DEFAULT_STORE_TIMEOUT_S) -> None:
        if not process_group_active():
            raise ValueError(
                "no torch.distributed process group: call torch.distributed.init_process_group("
                "'gloo', init_method=..., rank=..., world_size=...) in every process first"
            )
        # torch has no public accessor for the default group's store; a clone is a separate
        # connection, so the timeout set here does not change the group's.
        self._store = _clone_within(dist.distributed_c10d._get_default_store(), timeout_s)
        self._store.set_timeout(datetime.timedelta(seconds=timeout_s))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:  # DistStoreError and the store's connection errors
            raise RendezvousError(f"process group store: {what} failed: {e}") from e

    def store_host(self) -> str | None:
        """The host of the group's TCP store if this rank serves it (rank 0 under tcp:// and
        env:// initialisation): the address every other rank already reaches it at."""
        store = self._store
        while isinstance(store, dist.PrefixStore):
            store = store.underlying_store
        return store.host if isinstance(store, dist.TCPStore) and self.rank == 0 else None

    def publish_server(self, address: str, auth_key: bytes) -> ServerRecord:
        """Publish this rank's parameter server; returns what was published."""
        record = ServerRecord(address, auth_key, self.rank, secrets.token_hex(8))
        self._call("publishing the server address", self._store.set, _SERVER_KEY, record.to_json())
        return record

    def withdraw_server(self, record: ServerRecord) -> None:
        """Remove ``record`` from the store if it is still the server published there: once
        its server has ended, a DownpourSGD made later waits for the next one, where it read
        this one's address and retried it, gone, for a minute."""
        if not self._call("looking up the server", self._store.check, [_SERVER_KEY]):
            return
        raw = self._call("reading the server address", self._store.get, _SERVER_KEY)
        if ServerRecord.from_json(raw.decode()).session == record.session:
            self._call("withdrawing the server address", self._store.delete_key, _SERVER_KEY)

    def find_server(self, timeout_s: float) -> ServerRecord:
        """The published parameter server, waiting up to ``timeout_s`` for it.

        Raises:
            RendezvousError: nothing published within ``timeout_s``, or the store failed.
        """
        start = time.monotonic()
        deadline, said = start + timeout_s, False
        # Short checks rather than one long store wait, so Ctrl-C is not held up.
        while not self._call("looking up the server", self._store.check, [_SERVER_KEY]):
            if not said and time.monotonic() - start >= _SAY_WAITING_AFTER_S:
                said = True
                logger.warning(
                    "waiting up to %gs (hold_timeout_s) for a ParameterServer to publish its "
                    "address in the process group's store: run ParameterServer(model).run() "
                    "on one rank",
                    timeout_s,
                )
            if time.monotonic() > deadline:
                raise RendezvousError(
                    f"no ParameterServer published its address in the process group's store "
                    f"within {timeout_s:g}s: run ParameterServer(model).run() on one rank"
                )
            time.sleep(_POLL_S)
        raw = self._call("reading the server address", self._store.get, _SERVER_KEY)
        return ServerRecord.from_json(raw.decode())

    def register_worker(self, session: str, worker_id: str) -> None:
        """Claim this rank for this process at the server of ``session`` (a process claims it
        again freely: a script's second DownpourSGD), then record the worker id it gives the
        server (which tells by it whether the rank is still connected).

        Raises:
            RendezvousError: another process holds this rank (one started with the same rank
                as a running one: its finish would end the running one's), or the store failed.
        """
        holder = f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_TOKEN}"
        key = f"{_HOLDER_PREFIX}/{session}/{self.rank}"
        # Atomic: of two processes claiming a rank at once, exactly one gets it.
        held_by = self._call("claiming this rank", self._store.compare_set, key, "", holder)
        if held_by.decode() != holder:
            raise RendezvousError(
                f"rank {self.rank} is taken: process {held_by.decode()} (host:pid:token) trains "
                f"as rank {self.rank} with the ParameterServer; give this process a rank of its "
                "own"
            )
        key = f"{_WORKER_PREFIX}/{session}/{self.rank}"
        self._call("registering this rank's worker id", self._store.set, key, worker_id)

    def worker_ids(self, session: str, ranks: list[int]) -> dict[int, str]:
        """The worker id each of ``ranks`` registered for ``session`` (those that did)."""
        ids = {}
        for rank in ranks:
            key = f"{_WORKER_PREFIX}/{session}/{rank}"
            if self._call("reading worker ids", self._store.check, [key]):
                ids[rank] = self._call("reading worker ids", self._store.get, key).decode()
        return ids

    def release_rank(self, session: str, rank: int) -> None:
        """Let another process claim ``rank`` at the server of ``session`` (its holder is
        gone: a process restarted with its rank may take over)."""
        key = f"{_HOLDER_PREFIX}/{session}/{rank}"
        self._call("releasing a lost rank", self._store.delete_key, key)

    def mark_finished(self, session: str) -> None:
        """Record that this rank is done with the server of ``session``."""
        key = f"{_FINISHED_PREFIX}/{session}/{self.rank}"
        self._call("marking this rank finished", self._store.set, key, "1")

    def unfinished_ranks(self, session: str, ranks: list[int]) -> list[int]:
        """Those of ``ranks`` not yet marked finished for ``session``."""
        return [
            rank
            for rank in ranks
            if not self._call(
                "reading finished ranks",
                self._store.check,
                [f"{_FINISHED_PREFIX}/{session}/{rank}"],
            )
        ]
