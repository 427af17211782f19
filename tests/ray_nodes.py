"""A Ray cluster of several nodes on this machine, for tests: each node started by ``ray start``
on a loopback address of its own (127.0.0.2, 127.0.0.3, ...), with its own CPUs and custom
resource, in a session of its own, with a fresh token and a temporary folder. ``stop`` ends
exactly the processes of those sessions (and the actors' workers, which leave with their node).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import CHILD_ENV, free_port

_START_TIMEOUT_S = 120.0
_STOP_GRACE_S = 5.0
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def node_processes(session_ids: list[int]) -> set[int]:
    """Live processes of the sessions ``session_ids`` and their descendants (the actors'
    processes, which Ray puts in sessions of their own), from /proc."""
    parents: dict[int, int] = {}
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        if int(fields[3]) in session_ids:
            found.add(pid)
    while True:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        if not children:
            return found
        found |= children


class RayNodes:
    """Ray nodes on loopback; ``env`` is what a driver needs to join them (the token)."""

    def __init__(self) -> None:
        # Short: Ray's sockets live below it, and a socket path has at most 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="dbray-")
        self.env = {
            **CHILD_ENV,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's default (15) starves the actors on a machine busy with other work.
            "RAY_worker_niceness": "0",
        }
        self.address = ""
        self.client_port = 0
        """The head's Ray Client server's port (a gRPC server, but no GCS)."""
        self.sessions: list[int] = []
        self.node_ips: list[str] = []

    def add_node(self, num_cpus: int, resource: str) -> None:
        """Starts one more node (the first is the head) with ``num_cpus`` CPUs and one unit of
        the custom resource ``resource``.

        Raises:
            RuntimeError: ``ray start`` failed or took longer than 120 s.
        """
        node_ip = f"127.0.0.{len(self.node_ips) + 2}"
        ports = {"--dashboard-agent-listen-port": free_port()}
        if not self.address:
            role = ["--head", "--port=0", "--include-dashboard=false"]
            self.client_port = free_port()
            ports |= {"--ray-client-server-port": self.client_port, "--dashboard-port": free_port()}
        else:
            role = ["--address", self.address]
        command = [
            *RAY,
            "start",
            *role,
            f"--node-ip-address={node_ip}",
            f"--num-cpus={num_cpus}",
            f'--resources={{"{resource}": 1}}',
            "--object-store-memory=100000000",
            f"--temp-dir={self.temp_dir}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,  # every process of the node stays in this session
        )
        self.sessions.append(process.pid)
        try:
            output, _ = process.communicate(timeout=_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{output[-3000:]}")
        self.node_ips.append(node_ip)
        if not self.address:
            self.address = (Path(self.temp_dir) / "ray_current_cluster").read_text().strip()

    def stop(self) -> None:
        """Ends every process of the nodes' sessions (TERM, then KILL), and their folder."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in node_processes(self.sessions):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + _STOP_GRACE_S
            while node_processes(self.sessions) and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
