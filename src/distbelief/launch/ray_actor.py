"""What one Ray actor of a job runs: a plain class that the Ray cluster makes remote. Each call of
``run`` is one life of one process: link back to the launcher, run the role of its spec (a shard
on this node's address), report its events, its result or its traceback over the link. Ray
re-creates the actor after a death; the launcher then calls ``run`` again.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import threading
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from distbelief.launch.child import ChannelEmitter
from distbelief.launch.entry import ROLE_MODULES, run_role
from distbelief.launch.remote_events import connect_events, watch_stop

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.launch.cluster import ProcessSpec
    from distbelief.wire.security import WireSecurity

PRELOAD = ("torch", "torch._dynamo", *ROLE_MODULES)
"""What an actor imports when it is made, before it runs a role (see the local cluster's)."""

ORPHAN_GRACE_S = 30.0
"""Seconds an actor outlives its launcher's link before it leaves by itself."""


class RoleActor:
    """One process of a job (shard, worker, evaluator, coordinator) as a Ray actor.

    Args:
        name: the process's name (``shard0``, ``worker3``, ...).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
        # Made before its first run (while the shards start, say): the imports are paid then.
        for module in PRELOAD:
            importlib.import_module(module)

    def run(
        self,
        events: tuple[str, int],
        spec: ProcessSpec,
        config: JobConfig,
        addresses: Sequence[str],
        security: WireSecurity,
    ) -> str:
        """Runs ``spec``'s role to its end, reporting to the launcher at ``events``.

        Returns:
            "done" or "error"; the result, or the traceback, went over the link before.
        """
        import ray  # in the actor's process, where Ray is running already

        context = ray.get_runtime_context()
        node_ip = ray.util.get_node_ip_address()
        info = {"pid": os.getpid(), "node_ip": node_ip, "node_id": context.get_node_id()}
        assert security.auth_key is not None, "the launcher always makes a job key"
        link = connect_events(events, security.auth_key, self.name, info)
        stop = threading.Event()
        # Ray ends the actors of a launcher that is gone; the link's end is only a fallback.
        watch = threading.Thread(target=watch_stop, args=(link, stop, ORPHAN_GRACE_S))
        watch.daemon = True
        watch.start()
        emit = ChannelEmitter(link, self.name)
        try:
            result = run_role(
                emit, on_node(spec, config, node_ip), config, addresses, security, stop
            )
        except BaseException:
            emit("error", traceback.format_exc())
            return "error"
        emit("done", result)
        return "done"


def on_node(spec: ProcessSpec, config: JobConfig, node_ip: str) -> ProcessSpec:
    """``spec`` with a first start's listening address (any port of the configured host) moved
    to this node's address; a restart keeps its old address (it runs on the same node)."""
    if spec.bind == f"tcp://{config.cluster.host}:0":
        return dataclasses.replace(spec, bind=f"tcp://{node_ip}:0")
    return spec
