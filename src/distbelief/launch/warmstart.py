"""What the launcher does about a Downpour job's warm start (``--warmstart-steps K``: worker 0
trains alone until the shards have applied its first K updates, the other workers wait) when
worker 0 is given up before that: the others would wait for updates that never come, until
their hold timeout (minutes), and then fail. It tells every shard the warm start is over
(``END_WARMSTART``, ``wire/warmstart_ops.py``), so the waiting workers start at once from the
parameters as they are, and the job goes on with them, as after any worker given up. A shard
forgets it when it restarts (and one that dies just after it was told was told in vain): every
shard that listens after the warm start ended is told again, so that a one-shard job does not
wait for updates that never come either. It only talks to the shards; which faults give a
process up is the Cluster's business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distbelief.errors import PSError
from distbelief.launch.cluster import Event, Fault, ProcessKind, replica_name
from distbelief.wire import Message, connect
from distbelief.wire.warmstart_ops import END_WARMSTART

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity

logger = logging.getLogger(__name__)

_WARMSTART_REPLICA = replica_name(0)
"""The replica that trains alone during the warm start."""


def end_warmstart(
    addresses: Sequence[str] | Mapping[int, str], timeout_s: float, **connect_options: Any
) -> tuple[list[int], dict[str, str]]:
    """Tells every shard the warm start is over, each over a fresh connection closed right
    after (one that does not answer does not stop the others being told).

    Args:
        addresses: the shards' addresses, in shard-id order (or some shards': id -> address).
        timeout_s: limit for connecting to and for the request of each shard.
        **connect_options: passed to ``distbelief.wire.connect`` (the job's ``security``).

    Returns:
        The versions the told shards had reached (one per initialised parameter group of
        each), and the shards that could not be told (name -> why).
    """
    versions: list[int] = []
    failed: dict[str, str] = {}
    shards = addresses if isinstance(addresses, Mapping) else dict(enumerate(addresses))
    for shard_id, address in shards.items():
        name = f"shard{shard_id}"
        transport = connect(
            address, name=f"{name} ({address})", connect_timeout_s=timeout_s, **connect_options
        )
        try:
            reply = transport.request(Message(END_WARMSTART), timeout_s=timeout_s)
            versions.extend(int(v) for v in reply.meta.get("versions", {}).values())
        except PSError as e:
            failed[name] = f"{type(e).__name__}: {e}"
        finally:
            transport.close()
    return versions, failed


class WarmstartRelease:
    """Ends the job's warm start early when its replica (worker 0) is given up: give
    ``on_fault`` every fault, ``shards_ready`` the shards' addresses once they listen
    (before any worker starts, so before worker 0 can be given up), and ``on_ready`` every
    "ready" event (a restarted shard is told again).

    Args:
        config: the job (its warm start, algorithm and request timeout).
        security: the job's wire security.
        message: shows one line in the launcher's output (a sink's ``message``: the text, and
            when it happened on the records' clock, or None for the latest record's time).
    """

    def __init__(
        self,
        config: JobConfig,
        security: WireSecurity,
        message: Callable[[str, float | None], None],
    ) -> None:
        # Only Downpour's workers wait for a warm start, and only where there are others.
        waits = config.optimizer.algorithm == "downpour" and config.cluster.num_workers > 1
        self.steps = config.optimizer.warmstart_steps if waits else 0
        self.timeout_s = config.faults.timeout_s
        self.security = security
        self.message = message
        self.addresses: list[str] = []
        self.released = False
        self.told = False
        """Whether a shard has been told the warm start is over (the waiting workers start)."""

    def shards_ready(self, addresses: Sequence[str]) -> None:
        """The shards' addresses, in shard-id order."""
        self.addresses = list(addresses)

    def on_fault(self, fault: Fault) -> None:
        """Ends the warm start if ``fault`` gave up worker 0 (or a stage of its replica) and
        the warm start is not over already; says so in the launcher's output."""
        # A stage's fault names it "worker0.stage1": its replica is what was given up.
        replica = fault.process.partition(".")[0]
        if (
            self.released
            or not self.steps
            or fault.action != "given up"
            or replica != _WARMSTART_REPLICA
            or not self.addresses
        ):
            return
        # Before the requests: a shard that restarts from now on is told when it listens.
        self.released = True
        versions, failed = end_warmstart(self.addresses, self.timeout_s, security=self.security)
        self.told = len(failed) < len(self.addresses)
        reached = min(versions, default=0)
        if failed and not versions:
            self.message(
                f"{_WARMSTART_REPLICA} was given up during its warm start, and no shard could "
                f"be told to end it ({'; '.join(f'{n}: {why}' for n, why in failed.items())}): "
                "a shard that restarts is told once it listens; till then the other workers "
                "wait for it (until their hold timeout)",
                fault.time_s,  # not the latest record's time, which may come before the death
            )
            return
        for name, why in failed.items():
            logger.warning("could not tell %s the warm start is over: %s", name, why)
        if reached < self.steps:
            self.message(
                f"{_WARMSTART_REPLICA} was given up during its warm start: the other workers "
                f"start now, from the shards' parameters after {reached} of its "
                f"{self.steps} warm-start updates",
                fault.time_s,
            )

    def on_ready(self, event: Event) -> None:
        """Tells a shard that listens once the warm start has ended (a restarted shard: it
        forgets, and was perhaps told just before it died) that it has ended."""
        if not self.released or event.source.kind is not ProcessKind.SHARD:
            return
        shard_id, address = event.source.index, event.payload["address"]
        if shard_id < len(self.addresses):
            self.addresses[shard_id] = address
        _, failed = end_warmstart({shard_id: address}, self.timeout_s, security=self.security)
        for name, why in failed.items():
            logger.warning("could not tell %s the warm start is over: %s", name, why)
        if failed:
            return
        if not self.told:
            self.message(
                f"{event.source.name} listens again and was told the warm start is over: the "
                "other workers start now",
                None,
            )
        self.told = True
        logger.info("told %s, listening again, that the warm start is over", event.source.name)
