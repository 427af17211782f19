"""A spawned process that starts servers on request: where the timing benchmarks' shards (and
wire.py's raw baseline) run, away from the process being timed.

``ServerHost(start, *args)`` starts the process; each ``start_server()`` calls
``start(*args)`` there (a top-level function or class, so spawn can pickle it) and returns the
new server's address. ``close()`` stops every server and the process, which also exits by
itself when its parent dies.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable

import torch

from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.wire import serve

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
IDLE_POLL_S = 0.2


def start_sgd_shard(lr: float):
    """The project's server: one plain-SGD shard of a one-shard model on a free port."""
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=lr))
    return serve("tcp://127.0.0.1:0", ShardService(shard))


def _next_command(control) -> str:
    parent = mp.parent_process()
    while not control.poll(IDLE_POLL_S):
        if parent is not None and not parent.is_alive():
            return "stop"
    return control.recv()


def _host_main(control, start: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    servers = []
    try:
        while _next_command(control) == "serve":
            servers.append(start(*args))
            control.send(servers[-1].address)
    except (KeyboardInterrupt, EOFError, OSError):
        pass
    finally:
        for server in servers:
            server.stop()


class ServerHost:
    """One spawned process that runs ``start(*args)`` servers; a context manager."""

    def __init__(self, start: Callable, *args, name: str) -> None:
        context = mp.get_context("spawn")
        self._control, child_end = context.Pipe()
        self._process = context.Process(
            target=_host_main, args=(child_end, start, args), name=name, daemon=True
        )
        self._process.start()
        child_end.close()

    def start_server(self) -> str:
        """A new server's address.

        Raises:
            TimeoutError: the process did not answer within START_TIMEOUT_S.
            EOFError: the process has died.
        """
        self._control.send("serve")
        if not self._control.poll(START_TIMEOUT_S):
            raise TimeoutError(f"{self._process.name} did not answer in {START_TIMEOUT_S:g}s")
        return self._control.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._control.send("stop")
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(STOP_TIMEOUT_S)
        self._control.close()

    def __enter__(self) -> ServerHost:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
