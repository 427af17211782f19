"""The seed's example flow: one server and two training nodes started by hand."""

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import stop_processes

EXAMPLE = Path(__file__).parents[2] / "examples" / "main.py"
OFFLINE = ["--dataset", "digits", "--model", "lenet", "--lr", "0.1", "--batch-size", "32"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_and_two_nodes(tmp_path):
    port = str(_free_port())
    common = [*OFFLINE, "--port", port, "--world-size", "3", "--out", str(tmp_path)]
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--rank", "0", "--server", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "ready" in server.stdout.readline()
        nodes = [
            subprocess.Popen(
                [sys.executable, str(EXAMPLE), "--rank", str(rank), "--epochs", "3", *common],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (1, 2)
        ]
        for node in nodes:
            out, err = node.communicate(timeout=180)
            assert node.returncode == 0, err[-2000:]
            assert "epoch 2: test accuracy" in out
        for rank in (1, 2):
            assert (tmp_path / f"node{rank}" / "accuracy_vs_time.png").stat().st_size > 0
    finally:
        stop_processes([server])


def test_no_distributed_runs_plain_sgd(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--no-distributed",
            *OFFLINE,
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "node0" / "metrics.csv").exists()
