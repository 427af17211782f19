"""The launcher's shard-stats poll against a real shard: counters, rates, a dead shard, and a
launcher that polls and writes TensorBoard events without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.errors import ShardUnavailableError
from distbelief.sharding import TensorSpec
from distbelief.telemetry import ShardStatsPoller, poll_shard_stats
from tests.conftest import served_shards

SPECS = [TensorSpec("weight", (64, 32), torch.float32), TensorSpec("bias", (32,), torch.float32)]
NUM_BYTES = (64 * 32 + 32) * 4
POLL_TIMEOUT_S = 30.0


def test_a_poll_is_not_due_again_before_every_s() -> None:
    # An hour between polls: however slow the first poll, the second call comes before it.
    with served_shards(1) as (_, addresses):
        poller = ShardStatsPoller(addresses, every_s=3600.0, timeout_s=POLL_TIMEOUT_S)
        assert [r["version"] for r in poller.poll_if_due()] == [0]
        assert poller.poll_if_due() == []


def test_poll_reports_pushes_bytes_and_version(shard_cluster, monkeypatch) -> None:
    # Bytes on the wire: over TCP (on one host, pushes through shared memory carry none).
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    addresses = shard_cluster(2)
    client = ParameterServerClient(addresses, SPECS, timeout_s=POLL_TIMEOUT_S)
    # Polls that must answer get a bound no busy machine reaches: the poller turns a timeout
    # into "no records", which would read as a wrong answer.
    poller = ShardStatsPoller(addresses, every_s=1.0, timeout_s=POLL_TIMEOUT_S)
    try:
        client.handshake({torch.float32: torch.zeros(64 * 32 + 32)})
        polled_at = time.monotonic()
        assert [r["version"] for r in poller.poll_if_due()] == [0, 0]
        for _ in range(3):
            client.wait(client.push({torch.float32: torch.ones(64 * 32 + 32)}))
        time.sleep(1.05)
        records = poller.poll_if_due()
    finally:
        client.close()
    interval_s = time.monotonic() - polled_at  # an upper bound on the time between the polls
    assert [(r["role"], r["rank"], r["version"]) for r in records] == [
        ("shard", 0, 3),
        ("shard", 1, 3),
    ]
    assert all(r["pushes_per_s"] > 0 and r["staleness"] == 0.0 for r in records)
    # Each shard received its half of three pushes' bytes in the interval.
    assert sum(r["bytes_per_s"] for r in records) >= 3 * NUM_BYTES / interval_s
    stats = poll_shard_stats(addresses, timeout_s=POLL_TIMEOUT_S)
    assert [s["num_pushes"] for s in stats] == [3, 3]
    assert sum(s["bytes_received"] for s in stats) == 3 * NUM_BYTES


def test_unreachable_shard_raises_but_the_poller_does_not() -> None:
    dead = ["tcp://127.0.0.1:1"]
    with pytest.raises(ShardUnavailableError):
        poll_shard_stats(dead, timeout_s=1.0)
    assert ShardStatsPoller(dead, timeout_s=1.0).poll_if_due() == []


LAUNCHER_AT_WORK = """
import json, sys, tempfile
from pathlib import Path
from distbelief.telemetry import ShardStatsPoller, TensorBoardLog
poller = ShardStatsPoller(sys.argv[1:], timeout_s=30.0)
records = poller.poll_if_due()
with tempfile.TemporaryDirectory() as folder, TensorBoardLog(Path(folder)) as log:
    for record in records:
        log.write(record)
    log.write({"role": "worker", "rank": 0, "step": 1, "loss": 0.5})
    written = sorted(path.name[:20] for path in (Path(folder) / "tensorboard").iterdir())
print(json.dumps({"records": records, "written": written, "torch": "torch" in sys.modules}))
"""


def test_the_launchers_poll_and_tensorboard_log_run_without_torch(shard_cluster) -> None:
    """What the launcher does while a job runs: its processes' forkserver has torch loaded,
    the launcher itself never loads it (seconds of CPU and ~250 MB per job)."""
    addresses = shard_cluster(2)
    command = [sys.executable, "-c", LAUNCHER_AT_WORK, *addresses]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert [(r["rank"], r["version"]) for r in seen["records"]] == [(0, 0), (1, 0)]
    assert seen["written"] == ["events.out.tfevents."]
    assert seen["torch"] is False
