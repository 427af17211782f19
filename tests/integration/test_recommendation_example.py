"""examples/recommendation.py as its docstring says to run it: two shard processes started
first, then the script, which must learn clicks (test AUC well above chance)."""

import contextlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from distbelief.data.synthetic_ctr import make_synthetic_ctr
from tests.conftest import CHILD_ENV, load_script, refusal, stop_processes

EXAMPLE = Path(__file__).parents[2] / "examples" / "recommendation.py"


def _docstring_shard_flags() -> list[str]:
    """The training flags of the docstring's ``distbelief ps`` commands (the same for each
    shard): what follows ``--no-auth``, up to the ``&``."""
    commands = re.findall(
        r"distbelief ps (.*?) &", load_script(EXAMPLE).__doc__.replace("\\\n", " ")
    )
    flags = {tuple(shlex.split(command.partition("--no-auth")[2])) for command in commands}
    assert len(commands) == 2 and len(flags) == 1, commands
    return list(flags.pop())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_example_learns_clicks_against_two_shards(shard_cluster):
    """As the docstring runs it: its shards' flags, the script's defaults. A test AUC near 0.69
    (0.59 with the shards' dense layers at the default --server-lr 0.05)."""
    addresses = shard_cluster(2, *_docstring_shard_flags())
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--ps", ",".join(addresses)],
        capture_output=True,
        text=True,
        timeout=340,
        env=CHILD_ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"test AUC ([\d.]+) \(the hidden model's: ([\d.]+)\)", done.stdout)
    assert found is not None, done.stdout
    assert 0.66 <= float(found.group(1)) < float(found.group(2)), done.stdout


def _as_a_background_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell does to a command run with &


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_training_is_one_line_and_exit_130(shard_cluster, signum):
    addresses = shard_cluster(2)
    process = subprocess.Popen(
        [
            *(sys.executable, str(EXAMPLE), "--ps", ",".join(addresses)),
            *("--steps", "100000", "--table-size", "200", "--log-interval", "1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
        preexec_fn=_as_a_background_job,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("step 1: loss")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        stop_processes([process])
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "recommendation.py: interrupted"


_PULLS_IN_FLIGHT = """
import signal, sys
import torch
from distbelief import ParameterServerClient
from distbelief.sharding import tensor_specs

client = ParameterServerClient([sys.argv[1]], tensor_specs([("w", torch.zeros(1_000_000))]))
flat = {torch.float32: torch.zeros(1_000_000)}
client.handshake(flat)
pulls = [client.pull(flat) for _ in range(100)]  # queued on the shard's I/O thread
client.wait(pulls[0])
print("pulling", flush=True)
signal.pause()  # until Ctrl-C, with no close()
"""


@pytest.mark.timeout(300)
def test_ctrl_c_while_pulls_are_in_flight_ends_as_python_does(shard_cluster):
    # Each pull copies the shard's parameters out of shared memory on the client's I/O thread,
    # inside a torch call: a daemon thread still in one as the interpreter finalized aborted
    # the process (-6, "terminate called without an active exception") in place of the exit.
    process = subprocess.Popen(
        [sys.executable, "-c", _PULLS_IN_FLIGHT, shard_cluster(1)[0]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**CHILD_ENV, "DISTBELIEF_TRANSPORT": "auto"},  # reads from shared memory
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "pulling\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        stop_processes([process])
    assert process.returncode == -signal.SIGINT, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "KeyboardInterrupt"


def test_a_bad_value_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--ps", "garbage", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=CHILD_ENV,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "recommendation.py: error: argument --ps: address 'garbage' is not of the form "
        "tcp://HOST:PORT"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ps", ""], "argument --ps: no parameter-server address given"),
        (["--ps", "tcp://127.0.0.1:99999"], "argument --ps: address 'tcp://127.0.0.1:99999'"),
        (["--ps", "udp://127.0.0.1:7000"], "argument --ps: address 'udp://127.0.0.1:7000'"),
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--batch-size", "-1"], "argument --batch-size: must be >= 1, got -1"),
        (["--batch-size", "100001"], "argument --batch-size: must be <= the 100000 training"),
        (["--log-interval", "0"], "argument --log-interval: must be >= 1, got 0"),
        (["--table-size", "1"], "argument --table-size: must be in [2, 2147483648], got 1"),
        (["--table-size", str(2**40)], "argument --table-size: must be in [2, 2147483648]"),
        (["--lr", "inf"], "argument --lr: must be a finite number >= 0, got inf"),
        (["--lr", "nan"], "argument --lr: must be a finite number >= 0, got nan"),
        (["--lr", "-0.1"], "argument --lr: must be a finite number >= 0, got -0.1"),
        (["--row-cache-mb", "inf"], "argument --row-cache-mb: must be a finite number >= 0"),
        (["--row-cache-mb", "nan"], "argument --row-cache-mb: must be a finite number >= 0"),
        (["--row-cache-mb", "1e30"], "argument --row-cache-mb: must be <= 1073741824"),
        (["--lr", "1e39"], "argument --lr: must be <= 3.40282e+38, got 1e+39"),
        (["--ps", "tcp://127.0.0.1:0"], "argument --ps: address 'tcp://127.0.0.1:0': port 0"),
    ],
)
def test_bad_values_name_their_flag_before_anything_starts(capsys, argv, message):
    main = load_script(EXAMPLE).main
    assert message in refusal(main, ["--ps", "tcp://127.0.0.1:7000", *argv], capsys)


def test_shards_listed_in_another_order_are_bad_input(shard_cluster, capsys):
    addresses = shard_cluster(2)
    main = load_script(EXAMPLE).main
    argv = ["--ps", ",".join(reversed(addresses)), "--steps", "2"]
    refused = refusal(main, argv, capsys)
    assert ": error: argument --ps: shard 0 (" in refused
    assert "check the order of the addresses" in refused


def test_an_address_of_another_program_is_bad_input(capsys):
    """An HTTP server, say: `NotAPeerError`, exit 1, naming no flag (as distbelief worker's
    --ps names it)."""
    other = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        with contextlib.suppress(OSError):
            connection, _ = other.accept()
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b" " * 64)
                connection.recv(1024)

    threading.Thread(target=answer, daemon=True).start()
    try:
        main = load_script(EXAMPLE).main
        address = f"tcp://127.0.0.1:{other.getsockname()[1]}"
        refused = refusal(main, ["--ps", address, "--steps", "2"], capsys)
    finally:
        other.close()
    assert ": error: argument --ps: " in refused and "not a distbelief peer" in refused, refused


@pytest.mark.timeout(300)
def test_another_table_size_than_the_shards_hold_is_bad_input(shard_cluster, capsys, monkeypatch):
    # It was "TableSizeMismatchError: ..." and exit 1, as for shards that cannot be reached.
    script = load_script(EXAMPLE)

    def small(name, *, split, table_size):
        return make_synthetic_ctr(split, {"train": 600, "test": 200}[split], table_size=table_size)

    monkeypatch.setattr(script, "load_dataset", small)
    argv = ["--ps", shard_cluster(1)[0], "--steps", "1"]
    script.main([*argv, "--table-size", "50"])  # the shards' tables: 50 rows each
    refused = refusal(script.main, [*argv, "--table-size", "40"], capsys)
    assert ": error: argument --table-size: " in refused
    assert "holds 50 rows on shard 0, not 40" in refused


@pytest.mark.timeout(300)
def test_steps_beyond_one_epoch_go_on_into_the_next(shard_cluster, capsys, monkeypatch):
    # 600 training samples make 2 batches of 256 an epoch: --steps 5 needs three epochs.
    script = load_script(EXAMPLE)

    def small(name, *, split, table_size):
        assert name == "synthetic-ctr"
        return make_synthetic_ctr(split, {"train": 600, "test": 200}[split], table_size=table_size)

    monkeypatch.setattr(script, "load_dataset", small)
    addresses = shard_cluster(2)
    argv = ["--ps", ",".join(addresses), "--steps", "5", "--table-size", "50"]
    script.main([*argv, "--log-interval", "1"])
    steps = re.findall(r"^step (\d+): loss", capsys.readouterr().out, flags=re.MULTILINE)
    assert steps == ["1", "2", "3", "4", "5"]
