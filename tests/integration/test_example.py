"""The seed's example flow: one server and two training nodes started by hand, as three real
processes of one gloo process group; every one of them ends by itself."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from distbelief.config import dotted_fields
from distbelief.launch import run_dir_locked
from distbelief.plots import load_run, plot_run, run_title
from distbelief.plots import run as run_plots
from distbelief.plots.run import batch_size_of
from distbelief.telemetry import MetricsWriter, has_records, make_record
from tests.conftest import (
    CHILD_ENV,
    free_port,
    load_script,
    refusal,
    run_scripts_together,
    start_scripts,
    stop_processes,
)

EXAMPLE = Path(__file__).parents[2] / "examples" / "main.py"
OFFLINE = ["--dataset", "digits", "--model", "lenet", "--lr", "0.1", "--batch-size", "32"]
RUN_TIMEOUT_S = 600
"""Three processes, six epochs each: ~1 min on an idle machine, ~7 on a busy 2-core one."""
NUM_EPOCHS = 6
MIN_TEST_ACCURACY = 0.75
"""After six epochs on digits (chance is 0.1) runs reach ~0.9; three are too few to be sure."""
MIN_NODE_ACCURACY = 0.4
"""A node tests its own replica mid-training, at a rate of 0.1 against a server others push to
too: from one epoch to the next it dips by up to 0.25 (0.64 after 0.9 once, in a busy suite),
so its best epoch must reach MIN_TEST_ACCURACY and its last only show it learned."""
EVERY_STEP = ["--num-push", "1", "--num-pull", "1"]
"""Push and pull every step: little staleness, so the accuracy reached varies little."""


def _wait_until_training(node: subprocess.Popen, run_dir: Path) -> None:
    """Until ``node`` has written its first metrics record (it joined, found the server,
    stepped): the header alone comes first, before any step."""
    metrics = run_dir / "metrics.csv"
    deadline = time.monotonic() + 240
    while not has_records(metrics):
        assert time.monotonic() < deadline and node.poll() is None
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_server_and_two_nodes_end_by_themselves(tmp_path):
    common = [*OFFLINE, "--port", str(free_port()), "--world-size", "3", "--out", str(tmp_path)]
    commands = [["--rank", "0", "--server", *common]]
    node_flags = ["--epochs", str(NUM_EPOCHS), *EVERY_STEP, *common]
    commands += [["--rank", str(rank), *node_flags] for rank in (1, 2)]
    outputs = [
        out
        for out, _ in run_scripts_together([[str(EXAMPLE), *c] for c in commands], RUN_TIMEOUT_S)
    ]
    server_out = outputs[0]
    server_accuracy = re.search(r"server: \d+ updates applied, test accuracy ([\d.]+)", server_out)
    assert server_accuracy is not None, server_out
    assert float(server_accuracy.group(1)) >= MIN_TEST_ACCURACY
    for rank, out in zip((1, 2), outputs[1:], strict=True):
        epochs = re.findall(rf"node {rank} epoch (\d+): test accuracy ([\d.]+)", out)
        assert [int(epoch) for epoch, _ in epochs] == list(range(NUM_EPOCHS)), out
        accuracies = [float(accuracy) for _, accuracy in epochs]
        assert max(accuracies) >= MIN_TEST_ACCURACY, out
        assert accuracies[-1] >= MIN_NODE_ACCURACY, out
        assert (tmp_path / f"node{rank}" / "metrics.csv").exists()
        assert (tmp_path / f"node{rank}" / "accuracy_vs_time.png").stat().st_size > 0


def test_no_distributed_runs_plain_sgd(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--no-distributed",
            "--rank",
            "0",  # what a lone node is, spelled out (any other rank is refused)
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
    assert [path.name for path in tmp_path.iterdir()] == ["node0"]


def test_a_node_stopped_with_ctrl_c_draws_what_it_trained_and_exits_130(tmp_path):
    node = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLE),
            "--no-distributed",
            *OFFLINE,
            "--model",
            "mlp",
            "--log-interval",
            "1",
            "--epochs",
            "1000",
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        _wait_until_training(node, tmp_path / "node0")
        node.send_signal(signal.SIGINT)
        _, stderr = node.communicate(timeout=120)
    finally:
        stop_processes([node])
    assert node.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "main.py: interrupted"
    assert "Traceback" not in stderr
    assert (tmp_path / "node0" / "accuracy_vs_time.png").stat().st_size > 0


def test_a_bad_value_is_one_line_and_exit_2_from_the_script_itself(tmp_path):
    """One refusal as a real process prints it (the rest are checked in-process, below)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--port", "99999", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=CHILD_ENV,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "argument --port: must be in [1, 65535], got 99999" in last
    assert result.stderr.count("error:") == 1


def _stop_node_1_while_training(
    tmp_path: Path, stop: Callable[[subprocess.Popen], None]
) -> tuple[list[subprocess.Popen], list[tuple[str, str]]]:
    """The server and two nodes, ``stop`` applied to node 1 once it trains; returns the
    processes (ended) and what each wrote (stdout, stderr)."""
    common = ["--port", str(free_port()), "--world-size", "3", "--out", str(tmp_path)]
    flags = [*OFFLINE, "--model", "mlp", "--log-interval", "1", *common]
    commands = [["--rank", "0", "--server", *flags]]
    # Node 1 has far more epochs than it can train before it is stopped (3 take under half a second
    # here): the stop surely lands mid-training, however late a busy machine lets it come.
    epochs = {1: "200", 2: "3"}
    commands += [["--rank", str(rank), "--epochs", epochs[rank], *flags] for rank in (1, 2)]
    processes = start_scripts([[str(EXAMPLE), *command] for command in commands])
    try:
        _wait_until_training(processes[1], tmp_path / "node1")
        stop(processes[1])
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        stop_processes(processes)
    return processes, outputs


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_node_stopped_with_ctrl_c_leaves_and_the_others_end_by_themselves(tmp_path):
    """Ctrl-C on one node: it tells the server it is done and exits 130 with one line; the
    other node trains on, and the server ends when it finishes (it waited forever before)."""
    processes, outputs = _stop_node_1_while_training(
        tmp_path, lambda node: node.send_signal(signal.SIGINT)
    )
    assert processes[1].returncode == 130
    assert outputs[1][1].strip().splitlines()[-1] == "main.py: interrupted"
    assert "Traceback" not in outputs[1][1]
    assert [processes[0].returncode, processes[2].returncode] == [0, 0], outputs[0][1][-2000:]
    assert "server:" in outputs[0][0] and "updates applied" in outputs[0][0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_node_is_lost_and_the_others_end_by_themselves(tmp_path):
    """SIGKILL of a node: the other node trains on, and the server ends once it finishes and
    the killed node's connections have been closed for the liveness timeout, naming it."""
    processes, outputs = _stop_node_1_while_training(tmp_path, subprocess.Popen.kill)
    assert processes[2].returncode == 0, outputs[2][1][-2000:]
    assert processes[0].returncode == 1, outputs[0][1][-2000:]
    assert "updates applied" in outputs[0][0]
    server_err = outputs[0][1]
    assert "rank 1 left without finishing" in server_err
    assert server_err.strip().splitlines()[-1] == "server: ranks [1] left before they finished"
    assert "Traceback" not in server_err


def test_a_node_of_another_model_than_the_servers_is_refused_in_one_line(tmp_path):
    """A node started with another --model than the server's rank is refused as it joins
    (exit 2), instead of training a job whose parameters the server cannot take."""
    common = ["--dataset", "digits", "--port", str(free_port()), "--world-size", "2"]
    server, node = start_scripts(
        [
            [str(EXAMPLE), "--rank", "0", "--server", "--model", "lenet", *common],
            [str(EXAMPLE), "--rank", "1", "--model", "mlp", "--out", str(tmp_path), *common],
        ]
    )
    try:
        _, err = node.communicate(timeout=240)
    finally:
        stop_processes([server, node])
    assert node.returncode == 2, err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"main\.py: error: shard 0 \(tcp://\S+\): hello refused: tensor 'layers\.1\.weight' "
        r"\[256, 1024\] float32 does not match the server's model's 'features\.0\.weight' .*"
        r" \(give every rank the same --model and --dataset\)",
        last_line,
    ), last_line
    assert "Traceback" not in err
    assert not (tmp_path / "node1").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--join-timeout", "inf"],
            "argument --join-timeout: must be a finite number > 0, got inf",
        ),
        (
            ["--join-timeout", "nan"],
            "argument --join-timeout: must be a finite number > 0, got nan",
        ),
        (["--join-timeout", "-1"], "argument --join-timeout: must be a finite number > 0, got -1"),
        (["--join-timeout", "1e300"], "argument --join-timeout: must be <= 604800 (a week)"),
        (["--retry-timeout", "inf"], "argument --retry-timeout: must be a finite number >= 0"),
        # DownpourSGD's bounds: past them the node joined, then failed with a traceback.
        (["--retry-timeout", "1e300"], "argument --retry-timeout: must be <= 604800, got 1e+300"),
        (["--num-push", str(2**64)], f"argument --num-push: must be <= 2147483647, got {2**64}"),
        (["--lr", "inf"], "argument --lr: must be a finite number >= 0, got inf"),
        (["--lr", "nan"], "argument --lr: must be a finite number >= 0, got nan"),
        (["--lr", "1e39"], "argument --lr: must be <= 3.40282e+38, got 1e+39"),
        (["--model", "dlrm"], "argument --model: invalid choice: 'dlrm' (choose from 'lenet'"),
        (["--dataset", "criteo"], "argument --dataset: invalid choice: 'criteo'"),
        (["--world-size", str(2**31)], "argument --world-size: must be <= 2147483647"),
        (["--log-interval", "0"], "argument --log-interval: must be >= 1, got 0"),
        (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
        (["--threads", "100000"], "argument --threads: must be <= 1024, got 100000"),
        (["--server"], "rank 0 is the parameter server: run it, and only it, with --server"),
        (["--no-distributed", "--server"], "argument --server: not allowed with argument"),
        # It would write node1/ of a lone run that is no rank 1's.
        (["--no-distributed"], "argument --rank: a lone node (--no-distributed) is rank 0, got 1"),
        (["--data-dir", ""], "argument --data-dir: expected a value, got ''"),
        (["--master", ""], "argument --master: must be an IP address or host name (no port)"),
        (["--master", "127.0.0.1:5"], "argument --master: must be an IP address or host name"),
        (["--master", "tcp://x"], "argument --master: must be an IP address or host name"),
        (["--master", "[::1"], "argument --master: must be an IP address or host name"),
        (["--master", "no-such-host.invalid"], "argument --master: host 'no-such-host.invalid'"),
    ],
)
def test_bad_numbers_and_choices_are_refused_before_joining(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    main = load_script(EXAMPLE).main
    assert message in refusal(main, ["--rank", "1", *OFFLINE, *argv, "--out", str(out)], capsys)
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("mode", [["--rank", "1"], ["--no-distributed"]])
def test_an_empty_out_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys, mode):
    monkeypatch.chdir(tmp_path)
    main = load_script(EXAMPLE).main
    last = refusal(main, [*mode, *OFFLINE, "--out", ""], capsys)
    assert last.endswith("argument --out: expected a value, got ''"), last
    assert list(tmp_path.iterdir()) == []


def test_an_ipv6_master_is_put_in_brackets_for_torch():
    example = load_script(EXAMPLE)
    args = example.get_args_parser().parse_args(["--rank", "1", "--master", "::1", "--port", "5"])
    assert example.master_address(args) == "[::1]:5"
    args.master = "127.0.0.1"
    assert example.master_address(args) == "127.0.0.1:5"


def test_an_out_that_cannot_be_a_folder_is_refused_before_joining(tmp_path, capsys):
    example = load_script(EXAMPLE)
    file = tmp_path / "file"
    file.write_text("")
    unmakeable = [
        (file, f"{file} exists and is not a folder"),
        (tmp_path / ("b" * 300), "cannot create the folder: File name too long"),  # a traceback
    ]
    if Path("/proc/self").exists():  # takes no new folder, though the checks see it writable
        unmakeable.append((Path("/proc/distbelief-example"), "cannot create the folder"))
    for out, problem in unmakeable:
        for argv in (["--rank", "1"], ["--no-distributed"]):
            last = refusal(example.main, [*argv, *OFFLINE, "--out", str(out)], capsys)
            assert f": error: --out {out}/node" in last and problem in last, last


@pytest.mark.parametrize("mode", [["--rank", "1"], ["--no-distributed"]])
def test_a_batch_larger_than_the_nodes_share_is_refused_before_joining(tmp_path, capsys, mode):
    """A node would run no step (a pass drops its last, partial batch) and end with its initial
    accuracy, exit 0; the server would apply nothing. The other ranks never wait on it."""
    out = tmp_path / "out"
    argv = [*mode, *OFFLINE, "--batch-size", "5000", "--port", str(free_port())]
    argv += ["--join-timeout", "5", "--out", str(out)]
    last = refusal(load_script(EXAMPLE).main, argv, capsys)
    share = "719" if mode[0] == "--rank" else "1437"  # node 1: half of digits' 1437, rounded up
    assert f"argument --batch-size: must be <= the {share} training examples" in last, last
    assert last.endswith("got 5000"), last
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("mode", [["--rank", "1"], ["--no-distributed"]])
def test_a_node_folder_a_running_node_holds_is_refused_before_joining(tmp_path, capsys, mode):
    """A second node of one rank into one --out (``make first`` run twice) is refused in one
    line, exit 2, the running node's files untouched: it joined the process group as a second
    rank 1, trained, and wrote its metrics and plots over the running node's."""
    run_dir = tmp_path / ("node1" if mode[0] == "--rank" else "node0")
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("the running node's rows\n")
    argv = [*mode, *OFFLINE, "--epochs", "1", "--port", str(free_port()), "--join-timeout", "5"]
    with run_dir_locked(run_dir, "the running node"):
        last = refusal(load_script(EXAMPLE).main, [*argv, "--out", str(tmp_path)], capsys)
    assert last.endswith(
        f": error: --out {run_dir}: another job is using this run folder "
        f"(pid {os.getpid()}): wait for it to end, or stop it first"
    )
    assert [path.name for path in run_dir.iterdir()] == ["metrics.csv"]
    assert (run_dir / "metrics.csv").read_text() == "the running node's rows\n"


@pytest.mark.parametrize("others", [[], ["node2"]], ids=["fresh-out", "out-of-another-node"])
def test_a_rank_that_cannot_join_gives_up_in_one_line(tmp_path, others):
    """No rank 0 listens: the node waits its --join-timeout, then says so in one line (torch's
    C++ side would log each failed attempt with a stack trace first). It wrote nothing: the
    folders it made for its run are gone, those that were there are kept."""
    env = {key: value for key, value in CHILD_ENV.items() if key != "TORCH_CPP_LOG_LEVEL"}
    argv = ["--rank", "1", "--world-size", "3", "--port", str(free_port()), "--join-timeout", "3"]
    out = tmp_path / "runs" / "example"
    for other in others:
        (out / other).mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *argv, *OFFLINE, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines[0].startswith("rank 1: joining the process group at "), lines
    assert len(lines) == 2 and lines[1].startswith("main.py: cannot join the process group: "), (
        lines
    )
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == (
        [Path("runs"), Path("runs/example"), *(Path("runs/example", o) for o in others)]
        if others
        else []
    )


def _ignore_sigint() -> None:
    """As a shell starts a command in the background: SIGINT ignored from the start."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Each rank's wait (rank 0 serves the group's store) with each way a signal is taken; the
# handling of the signals is the script's, the same for both ranks.
@pytest.mark.parametrize(
    ("rank", "signum", "started"),
    [
        (0, signal.SIGINT, None),
        (0, signal.SIGTERM, None),
        (1, signal.SIGINT, None),
        (1, signal.SIGINT, _ignore_sigint),
    ],
    ids=["0-SIGINT", "0-SIGTERM", "1-SIGINT", "1-SIGINT-started-in-the-background"],
)
def test_a_rank_waiting_to_join_stops_on_ctrl_c_or_sigterm(tmp_path, rank, signum, started):
    """Ctrl-C or SIGTERM while a rank waits for the others: it exits 130 at once with one line
    (torch waits in C++, where the signal went unseen until --join-timeout ran out). A rank
    started with SIGINT ignored (in the background of a shell) stops on SIGINT too."""
    argv = ["--rank", str(rank), "--world-size", "3", "--port", str(free_port())]
    argv += ["--server"] if rank == 0 else []
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *argv, *OFFLINE, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
        preexec_fn=started,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(f"rank {rank}: joining the process group")
        time.sleep(1.0)  # into the wait in C++
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        stop_processes([process])
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "main.py: interrupted"


@pytest.mark.timeout(300)
def test_ranks_stopped_while_joining_the_servers_store_exit_130_each(tmp_path):
    """A rank connected to the server's store, stopped while the group still waits for a
    third: torch's rendezvous left a thread of its own in C++, which the interpreter's exit
    destroyed running (``terminate called without an active exception``, exit 134, 5 of 5).
    The server, given SIGTERM twice, exits 130 too (the second came in its exit: 143)."""
    common = ["--world-size", "3", "--port", str(free_port()), *OFFLINE, "--out", str(tmp_path)]
    ranks = (["--rank", "0", "--server"], ["--rank", "2"])
    server, node = start_scripts([[str(EXAMPLE), *rank, *common] for rank in ranks])
    try:
        for process in (server, node):
            assert process.stdout is not None
            assert process.stdout.readline().startswith("rank ")  # joining
        time.sleep(2.0)  # the node is in the server's store, waiting for rank 1
        node.send_signal(signal.SIGTERM)
        _, node_err = node.communicate(timeout=60)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        _, server_err = server.communicate(timeout=60)
    finally:
        stop_processes([server, node])
    assert (node.returncode, node_err.strip().splitlines()[-1]) == (130, "main.py: interrupted")
    assert "terminate called" not in node_err, node_err
    assert server.returncode == 130, server_err


def _read_timed_lines(stream) -> tuple[list[tuple[float, str]], threading.Thread]:
    """Every line of ``stream`` with the monotonic time it was read, read by the returned thread
    until the stream ends (join it once the process is gone)."""
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in stream:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


@contextlib.contextmanager
def _node_whose_server_is_killed(
    tmp_path: Path, retry_timeout_s: int
) -> Iterator[subprocess.Popen]:
    """A server and one node that trains far longer than a test lasts; once the node trains,
    the server is killed (SIGKILL). Yields the node; both processes are ended at the exit."""
    common = [*OFFLINE, "--model", "mlp", "--log-interval", "1", "--world-size", "2"]
    common += ["--port", str(free_port()), "--out", str(tmp_path)]
    server = ["--rank", "0", "--server", *common]
    node = ["--rank", "1", "--epochs", "1000", "--retry-timeout", str(retry_timeout_s), *common]
    processes = start_scripts([[str(EXAMPLE), *command] for command in (server, node)])
    try:
        _wait_until_training(processes[1], tmp_path / "node1")
        processes[0].kill()
        yield processes[1]
    finally:
        stop_processes(processes)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_node_whose_server_is_killed_gives_up_once(tmp_path):
    """SIGKILL of the server: the node retries for --retry-timeout, draws the plots of what it
    trained, then exits 1 with one line (its exit did not retry the last push for as long
    again: the node's retry warnings span one --retry-timeout, timed as they are read, so the
    exit's own time, torch's teardown and the plots, which take seconds on a busy machine,
    does not count)."""
    retry_timeout_s = 10
    with _node_whose_server_is_killed(tmp_path, retry_timeout_s) as node:
        _, out_reader = _read_timed_lines(node.stdout)
        err_lines, err_reader = _read_timed_lines(node.stderr)
        node.wait(timeout=120)
        for reader in (out_reader, err_reader):
            reader.join(timeout=60)
    err = "".join(line for _, line in err_lines)
    assert node.returncode == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("main.py: ShardUnavailableError: shard 0 "), last
    assert f"gave up after retrying for {retry_timeout_s}s" in last
    assert err.count("gave up") == 1, err[-2000:]
    retries = [read_at for read_at, line in err_lines if "; retrying in " in line]
    assert retries, err[-2000:]
    span_s = retries[-1] - retries[0]
    assert span_s < 1.6 * retry_timeout_s, f"the node retried for {span_s:.1f}s"
    assert (tmp_path / "node1" / "accuracy_vs_time.png").stat().st_size > 0  # what it trained


def test_a_nodes_plots_read_its_batch_size_and_setup_from_its_config(tmp_path):
    """The throughput plot's samples/s take the node's --batch-size (without a config.json it
    took train's default, 32), and titles name the model, data set and cluster."""
    out = tmp_path / "out"
    argv = ["--no-distributed", *OFFLINE, "--batch-size", "16", "--epochs", "1"]
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=CHILD_ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = load_run(out / "node0").config
    assert batch_size_of(config) == 16
    assert run_title(config, "node0") == "lenet on digits, 1 worker, 0 shards"
    example = load_script(EXAMPLE)
    args = example.get_args_parser().parse_args(["--rank", "2", "--num-push", "3"])
    node = dotted_fields(example.node_config(args))
    assert run_title(node, "node2") == "alexnet on cifar10, 2 workers, 1 shard"
    assert (node["optimizer.n_push"], node["optimizer.batch_size"]) == (3, 64)


def test_a_distributed_nodes_test_curve_is_labelled_as_its_own_not_the_servers(
    tmp_path, monkeypatch
):
    """A node tests its own replica after each epoch, not the server's parameters: its plots
    label that curve as the worker's (they said "PS (test)")."""
    example = load_script(EXAMPLE)
    args = example.get_args_parser().parse_args(["--rank", "2", "--world-size", "3"])
    run_dir = tmp_path / "node2"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(example.node_config(args)), encoding="utf-8")
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        writer.write(make_record("worker", 1, time_s=0.5, step=20, loss=1.0, accuracy=0.5))
        writer.write(
            make_record("evaluator", 1, time_s=1.0, step=20, test_loss=1.0, test_accuracy=0.6)
        )
    drawn = {}
    monkeypatch.setattr(
        run_plots,
        "save_pngs_atomic",
        lambda figures: drawn.update({path.name: figure for path, figure in figures.items()}),
    )
    plot_run(run_dir)
    lines = drawn["accuracy_vs_time.png"].axes[0].lines
    assert [line.get_label() for line in lines] == ["worker 1 (train)", "worker 1 (test)"]


def test_plots_that_cannot_be_drawn_are_a_warning_at_the_end_not_a_traceback(
    tmp_path, monkeypatch, caplog
):
    """A node that trained to the end and cannot write its plots (a full disk, say) says so in
    a warning naming the command that draws them later, as train does; it raised before."""

    def no_space(figures):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_plots, "save_pngs_atomic", no_space)
    out = tmp_path / "out"
    argv = ["--no-distributed", *OFFLINE, "--epochs", "1", "--out", str(out)]
    # main sets the process's SIGTERM handler and torch threads: this one's are put back.
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        load_script(EXAMPLE).main(argv)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)
    assert (out / "node0" / "metrics.csv").stat().st_size > 0
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "No space left on device" in line and f"distbelief plot {out / 'node0'}" in line
        for line in warning
    ), warning


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_a_node_retrying_its_killed_server_at_once(tmp_path):
    """Ctrl-C on a node whose server is gone, while it retries it: the node exits 130 with one
    line within seconds. Its close flushed the last push first, retrying the server for
    --retry-timeout again, then exited 1 with the ShardUnavailableError; and it waited the
    store's 30 s for the gone rank 0 to say it finished."""
    retry_timeout_s = 120
    with _node_whose_server_is_killed(tmp_path, retry_timeout_s) as node:
        err_lines, err_reader = _read_timed_lines(node.stderr)
        deadline = time.monotonic() + 60
        while not any("; retrying in " in line for _, line in err_lines):
            assert time.monotonic() < deadline and node.poll() is None
            time.sleep(0.2)
        node.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        node.wait(timeout=retry_timeout_s / 2)
        ended_s = time.monotonic() - interrupted_at
        err_reader.join(timeout=60)
    err = "".join(line for _, line in err_lines)
    assert node.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "main.py: interrupted"
    assert "Traceback" not in err and "gave up" not in err, err[-2000:]
    assert ended_s < 25, f"the node took {ended_s:.1f}s to stop"  # the store's 30 s and more
    assert (tmp_path / "node1" / "accuracy_vs_time.png").stat().st_size > 0  # what it trained


def test_a_corrupt_data_file_is_one_line_naming_it(tmp_path):
    """A CIFAR-10 batch cut short was a 30-line traceback, exit 1 (``distbelief worker``
    says it in one line, exit 2, as the README says of corrupt files)."""
    batches = tmp_path / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (batches / name).write_bytes(b"\x80\x04\x95" + bytes(97))  # a pickle cut short
    flags = ["--data-dir", str(tmp_path / "data"), "--epochs", "1", "--out", str(tmp_path / "o")]
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--no-distributed", "--dataset", "cifar10", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("main.py: error: argument --data-dir: "), line
    assert "test_batch" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
