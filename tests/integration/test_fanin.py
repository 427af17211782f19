"""2,000 replicas against one shard process for 20 s, the job key on (the load generator of
``benchmarks/fanin.py``): no replica fails, and none gets less than a third of the pushes most
replicas of its load process get.
The shard starts with a low open-file limit, raises it as far as the hard limit goes and says
that its connection cap no longer fits."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
from benchmarks import fanin_load

from distbelief.wire.security import read_key_file, write_key_file

NUM_REPLICAS = 2000
DURATION_S = 20.0
HARD_OPEN_FILES = 2400
"""Room for the 2,000 connections, not for the default cap of 4,096."""


@pytest.mark.slow
def test_2000_replicas_against_one_shard_for_20_s(tmp_path):
    key_file = write_key_file(tmp_path / "job.key")
    key = read_key_file(key_file)
    # The load processes import while the shard starts.
    with fanin_load.LoadProcesses(NUM_REPLICAS, num_processes=2, auth_key=key) as load:
        shards, addresses = fanin_load.start_shards(
            1, key_file, log_dir=tmp_path, open_files=(1024, HARD_OPEN_FILES)
        )
        try:
            fanin_load.initialise_shards(addresses, "mlp", key)
            result = load.run(addresses, DURATION_S)
            limits = Path(f"/proc/{shards[0].pid}/limits").read_text()
        finally:
            fanin_load.stop_shards(shards)
    assert result.errors == []
    assert len(result.pushes) == NUM_REPLICAS
    assert min(result.pushes) > 0
    # None starved. The fairness figure (max/min <= 2) is benchmarks/fanin.py's: on a busy
    # machine a replica whose packet the loopback dropped waits out a retransmission, and a load
    # process run less often than the other slows all its replicas alike.
    for pushes in result.pushes_by_process:
        median = statistics.median(pushes)
        assert min(pushes) >= median / 3, (min(pushes), median, max(pushes))
    assert re.search(rf"Max open files\s+{HARD_OPEN_FILES}\s+{HARD_OPEN_FILES}\s", limits)
    log = (tmp_path / "shard-0.log").read_text()
    assert f"serving at most {HARD_OPEN_FILES - 64 - 128} connections, not 4096" in log
