"""Hosts that are not 127.0.0.1: a job whose shards bind to two loopback addresses and whose
workers connect from a third, so nothing assumes one address per machine; and addresses that
are malformed or not this machine's, refused in one line naming the flag."""

import json
import re
import subprocess

import pytest

from distbelief.launch.cli import main
from tests.conftest import CHILD_ENV, CLI, run_forked, stop_processes

NOT_HERE = "192.0.2.1"
"""TEST-NET-1 (RFC 5737): never an address of a real machine."""


HOSTS = ("--shard-hosts", "127.0.0.2,127.0.0.3", "--worker-host", "127.0.0.4")
"""Shards on two loopback addresses, workers on a third."""


def _train_on_hosts(run_dir, *args: str) -> dict:
    result = run_forked(
        "train", *args, "--no-eval", "--no-plots", "--out", str(run_dir), *HOSTS, timeout_s=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _shards_saw_only_the_workers_host(summary: dict, *, named: bool = True) -> None:
    """The shards on their hosts; each named worker's connections came from the workers' host
    (Sandblaster's workers do not name themselves to the shards)."""
    shards = summary["shards"]
    assert shards["shard0"]["address"].startswith("tcp://127.0.0.2:")
    assert shards["shard1"]["address"].startswith("tcp://127.0.0.3:")
    for shard in shards.values():
        hosts = set(shard["worker_hosts"].values())
        assert hosts == ({"127.0.0.4"} if named else set())


def test_shards_on_two_addresses_serve_workers_from_a_third(tmp_path):
    run_dir = tmp_path / "run"
    summary = _train_on_hosts(run_dir, "--steps", "5")
    assert summary["worker_steps"] == {"0": 5, "1": 5}
    shards = summary["shards"]
    assert shards["shard0"]["address"].startswith("tcp://127.0.0.2:")
    assert shards["shard1"]["address"].startswith("tcp://127.0.0.3:")
    # What each shard saw: every worker's connections came from 127.0.0.4.
    for shard in shards.values():
        assert shard["worker_hosts"] == {"worker0": "127.0.0.4", "worker1": "127.0.0.4"}


def test_sandblaster_workers_reach_the_coordinator_from_their_host(tmp_path):
    summary = _train_on_hosts(
        tmp_path / "run",
        *("--algorithm", "sandblaster", "--model", "mlp", "--max-iterations", "2"),
    )
    assert summary["coordinator"]["iterations"] == 2
    workers = {"worker0": "127.0.0.4", "worker1": "127.0.0.4"}
    assert summary["coordinator"]["worker_hosts"] == workers
    _shards_saw_only_the_workers_host(summary, named=False)


def test_a_partitioned_job_runs_its_stages_on_the_workers_host(tmp_path):
    summary = _train_on_hosts(
        tmp_path / "run",
        *("--model", "mlp", "--partitions", "2", "--micro-batches", "2", "--steps", "5"),
    )
    assert summary["worker_steps"] == {"0": 5, "1": 5}
    _shards_saw_only_the_workers_host(summary)  # every stage's connections to its shards


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


_PS = ["ps", "--shard-id", "0", "--num-shards", "1", "--no-auth"]
_STAGE = [
    *("worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"),
    *("--partitions", "2", "--stage", "1"),
]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [*_PS, "--bind", "tcp://127.0.0.1:x "],
            "argument --bind: address 'tcp://127.0.0.1:x' is not of the form tcp://HOST:PORT",
        ),
        (
            [*_PS, "--bind", f"tcp://{NOT_HERE}:7000 "],
            f"argument --bind: {NOT_HERE} is not an address of this machine (",
        ),
        (
            [*_PS, "--bind", "tcp://127.0.0.1:0,tcp://127.0.0.1:0"],
            "argument --bind: one address, not 2",
        ),
        (
            [*_STAGE, "--bind", f"tcp://{NOT_HERE}:7000 "],
            f"argument --bind: {NOT_HERE} is not an address of this machine (",
        ),
        (
            [*_STAGE[:-2], "--stage", "0", "--next", "tcp://127.0.0.1:1,tcp://127.0.0.1:2"],
            "argument --next: one address, not 2",
        ),
    ],
    ids=["malformed", "not-here", "two", "stage-not-here", "two-next"],
)
def test_a_bad_bind_with_spaces_around_it_is_named_as_bind(argv, message, capsys):
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("garbage", "address 'garbage' is not of the form tcp://HOST:PORT"),
        ("shm://garbage", "address 'shm://garbage' is not of the form shm://HOST:PORT"),
        ("127.0.0.1:99999", "address '127.0.0.1:99999': port 99999 is out of range (0-65535)"),
    ],
    ids=["no-scheme", "shm", "port"],
)
def test_a_malformed_bind_is_named_once_as_typed(bind, message, capsys):
    # Not also as the tcp:// address it was read as ("'garbage': address 'tcp://garbage' ...").
    assert main([*_PS, "--bind", bind]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"distbelief ps: error: argument --bind: {message}"], errors


def test_a_bind_with_spaces_around_it_is_read_as_ps_is():
    """Spaces around --bind are dropped, as around each --ps address."""
    shard = subprocess.Popen(
        [*CLI, *_PS, "--bind", " tcp://127.0.0.1:0 "],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=CHILD_ENV,
    )
    said = []
    try:
        assert shard.stdout is not None
        while not said or not said[-1].startswith("serving shard"):
            said.append(shard.stdout.readline())
            if not said[-1]:  # it ended
                break
    finally:
        stop_processes([shard])
    assert re.fullmatch(r"serving shard 0 at tcp://127\.0\.0\.1:\d+\n", said[-1]), "".join(said)
