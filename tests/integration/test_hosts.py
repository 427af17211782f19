"""Hosts that are not 127.0.0.1: a job whose shards bind to two loopback addresses and whose
workers connect from a third, so nothing assumes one address per machine; and addresses that
are malformed or not this machine's, refused in one line naming the flag."""

import json

import pytest

from distbelief.launch.cli import main
from tests.conftest import run_cli

NOT_HERE = "192.0.2.1"
"""TEST-NET-1 (RFC 5737): never an address of a real machine."""


def test_shards_on_two_addresses_serve_workers_from_a_third(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        *("--steps", "5", "--no-eval", "--out", str(run_dir)),
        *("--shard-hosts", "127.0.0.2,127.0.0.3", "--worker-host", "127.0.0.4"),
        timeout_s=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["worker_steps"] == {"0": 5, "1": 5}
    shards = summary["shards"]
    assert shards["shard0"]["address"].startswith("tcp://127.0.0.2:")
    assert shards["shard1"]["address"].startswith("tcp://127.0.0.3:")
    # What each shard saw: every worker's connections came from 127.0.0.4.
    for shard in shards.values():
        assert shard["worker_hosts"] == {"worker0": "127.0.0.4", "worker1": "127.0.0.4"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--shard-hosts", "127.0.0.2,127.0.0.3:7000"],
            "argument --shard-hosts: must be IP addresses or host names (without a port or "
            "scheme), got '127.0.0.3:7000'",
        ),
        (
            ["train", "--worker-host", NOT_HERE],
            f"argument --worker-host: {NOT_HERE} is not an address of this machine (",
        ),
        (
            ["train", "--shard-hosts", f"127.0.0.2,{NOT_HERE}"],
            f"argument --shard-hosts: {NOT_HERE} is not an address of this machine (",
        ),
        (
            [
                *("worker", "--ps", "tcp://127.0.0.2:1", "--rank", "0", "--num-workers", "1"),
                *("--worker-host", NOT_HERE),
            ],
            f"argument --worker-host: {NOT_HERE} is not an address of this machine (",
        ),
    ],
)
def test_a_bad_host_is_a_one_line_error_naming_its_flag(argv, message, capsys, tmp_path):
    run_dir = tmp_path / "run"
    extra = ["--out", str(run_dir)] if argv[0] == "train" else []
    assert main([*argv, *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not run_dir.exists()
