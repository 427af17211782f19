"""The evaluator against real shard processes: same numbers as a direct evaluation, the
``distbelief eval`` command (once, and watching with --out), and its end when shards stop."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.client.rows import RowClient
from distbelief.config import JobConfig
from distbelief.data import load_dataset
from distbelief.errors import ShardUnavailableError
from distbelief.evaluator import PSEvaluator, evaluate, watch_shards
from distbelief.pipeline.job import parameter_groups
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.telemetry import MetricsWriter, make_record, read_metrics
from distbelief.worker import build_replica
from tests.conftest import (
    CHILD_ENV,
    CLI,
    free_port,
    pause_process,
    run_forked,
    served_shards,
    start_shard,
    stop_processes,
)

CONFIG = JobConfig.from_fields(
    {
        "model.name": "lenet",
        "data.name": "digits",
        "faults.timeout_s": 10.0,
        "reporting.eval_every_s": 0.2,
    }
)


def _initialise(addresses: list[str], seed: int) -> torch.nn.Module:
    """Puts the parameters of a model built with ``seed`` on the shards; returns that model."""
    test_set = load_dataset("digits", split="test")
    model = build_replica(
        CONFIG.with_fields({"model.seed": seed}), test_set.input_shape, test_set.num_classes
    )
    layout = FlatLayout(tensor_specs(model.named_parameters()))
    flats = layout.flatten([p.detach() for p in model.parameters()])
    client = ParameterServerClient(addresses, layout.specs, timeout_s=CONFIG.faults.timeout_s)
    try:
        assert client.handshake(flats)
    finally:
        client.close()
    return model


def test_evaluator_equals_direct_evaluation(shard_cluster) -> None:
    addresses = shard_cluster(2)
    # Seed 1 on the shards, seed 0 in the evaluator: only a real pull makes the numbers agree.
    model = _initialise(addresses, seed=1)
    evaluator = PSEvaluator(CONFIG, addresses)
    try:
        result = evaluator.evaluate()
    finally:
        evaluator.close()
    test_loss, test_accuracy = evaluate(model, evaluator.test_set)
    assert result["test_accuracy"] == test_accuracy
    assert result["test_loss"] == pytest.approx(test_loss, rel=1e-6)
    assert result["version"] == 0


def test_eval_once_prints_the_result(shard_cluster) -> None:
    addresses = shard_cluster(1)
    model = _initialise(addresses, seed=2)
    _, test_accuracy = evaluate(model, load_dataset("digits", split="test"))
    result = run_forked(
        "eval", "--ps", ",".join(addresses), "--model", "lenet", "--once", timeout_s=90
    )
    assert result.returncode == 0, result.stderr[-2000:]
    fields = dict(part.split("=") for part in result.stdout.split())
    assert float(fields["test_accuracy"]) == pytest.approx(test_accuracy, abs=1e-4)
    assert fields["version"] == "0"
    # The shards hold a LeNet: another --model is a usage error naming the tensors.
    refused = run_forked("eval", "--ps", addresses[0], "--model", "mlp", "--once", timeout_s=90)
    assert refused.returncode == 2, refused.stderr[-2000:]
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("distbelief eval: error: shard 0"), refused.stderr
    assert "does not match the shards' 'features.0.weight'" in line
    assert line.endswith("(give the job's --model and its flags)")


def test_eval_once_of_a_partitioned_model_names_each_version_and_the_split_flag(shard_cluster):
    # The shards hold mlp cut before layer 4 (its last Linear), each partition in its group.
    addresses = shard_cluster(2)
    fields = {"model.name": "mlp", "pipeline.num_partitions": 2, "pipeline.split_points": [4]}
    config = JobConfig.from_fields(fields)
    test_set = load_dataset("digits", split="test")
    model = build_replica(config, test_set.input_shape, test_set.num_classes)
    shape, classes = test_set.input_shape, test_set.num_classes
    for group, named in parameter_groups(config, model, shape, classes):
        layout = FlatLayout(tensor_specs(named))
        flats = layout.flatten([parameter.detach() for _, parameter in named])
        client = ParameterServerClient(addresses, layout.specs, timeout_s=60, group=group)
        try:
            assert client.handshake(flats)
            client.push_now({dtype: torch.zeros_like(flat) for dtype, flat in flats.items()})
        finally:
            client.close()  # one push to each partition's group: their versions are 1 and 1
    job = ("eval", "--ps", ",".join(addresses), "--model", "mlp", "--partitions", "2")
    result = run_forked(*job, "--split-points", "4", "--once", timeout_s=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["version=1", "partition_versions=1,1"]
    # Cut before layer 2, stage0's group would hold one Linear, not the shards' two.
    refused = run_forked(*job, "--split-points", "2", "--once", timeout_s=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("distbelief eval: error: shard 0"), refused.stderr
    assert line.endswith("(give the job's --model, --split-points and its flags)")


def _wait_for_rows(path: Path, num_rows: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") > num_rows:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not get {num_rows} rows in {timeout_s}s")


def _watch_while(address: str, out_dir: Path, meanwhile) -> tuple[int, str]:
    """``distbelief eval --out out_dir`` watching the shard at ``address`` while
    ``meanwhile()`` runs, then stopped by Ctrl-C: its exit code and stderr."""
    watcher = subprocess.Popen(
        [*CLI, "eval", "--ps", address, "--eval-every", "0.1", "--out", str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        meanwhile()
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(timeout=10)
    return watcher.returncode, stderr


def test_eval_watch_appends_to_metrics_csv(shard_cluster, tmp_path) -> None:
    addresses = shard_cluster(1)
    _initialise(addresses, seed=0)
    metrics = tmp_path / "metrics.csv"
    with MetricsWriter(metrics) as writer:  # an earlier row, which must survive
        writer.write(make_record("worker", 0, time_s=50.0, step=1, loss=2.0))
    returncode, stderr = _watch_while(
        addresses[0], tmp_path, lambda: _wait_for_rows(metrics, 2, timeout_s=60)
    )
    assert returncode == 130, stderr[-2000:]
    assert "eval t=" in stderr and "test_accuracy=" in stderr
    records = read_metrics(metrics)
    assert records[0]["role"] == "worker"
    # The version does not change, so the watcher records it once.
    assert [r["role"] for r in records[1:]] == ["evaluator"]
    # Its line's t= is the row's time_s, which goes on from the file's last.
    said = stderr.split("eval t=", 1)[1].split("s ", 1)[0]
    assert records[1]["time_s"] > 50.0 and said == f"{records[1]['time_s']:.1f}", stderr


def test_a_watch_holds_a_folder_it_makes_and_leaves_none_if_it_wrote_nothing(
    shard_cluster, tmp_path
) -> None:
    """Two watches into one new folder both appended to its metrics.csv (a folder that was
    not there was not held); a watch that writes nothing leaves no folder, its parents too."""
    addresses = shard_cluster(1)
    _initialise(addresses, seed=0)
    out_dir = tmp_path / "runs" / "watched"
    seconds = []

    def start_a_second_watch() -> None:
        _wait_for_rows(out_dir / "metrics.csv", 1, timeout_s=60)
        seconds.append(
            run_forked("eval", "--ps", addresses[0], "--out", str(out_dir), timeout_s=60)
        )

    returncode, stderr = _watch_while(addresses[0], out_dir, start_a_second_watch)
    assert returncode == 130, stderr[-2000:]
    [second] = seconds
    assert second.returncode == 2, second.stderr[-2000:]
    assert (
        second.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"distbelief eval: error: --out {out_dir}: another job is using this run folder (pid "
        )
    )
    assert [r["role"] for r in read_metrics(out_dir / "metrics.csv")] == ["evaluator"]
    unreached = tmp_path / "elsewhere" / "watched"
    refused = run_forked(
        *("eval", "--ps", "tcp://127.0.0.1:1", "--out", str(unreached)),
        *("--timeout", "2", "--retry-timeout", "1"),
        timeout_s=60,
    )
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert not (tmp_path / "elsewhere").exists()


def test_watch_refuses_a_metrics_csv_of_another_layout_before_reaching_the_shards(
    tmp_path,
) -> None:
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("time,role,rank\n1.0,worker,0\n", encoding="utf-8")
    # No shard listens there: reaching for one would retry for a minute, then fail otherwise.
    with pytest.raises(ValueError, match=r"metrics\.csv: cannot append"):
        watch_shards(CONFIG, ["tcp://127.0.0.1:1"], out_dir=str(tmp_path))
    assert metrics.read_text(encoding="utf-8") == "time,role,rank\n1.0,worker,0\n"


def test_a_watch_refused_before_its_first_evaluation_leaves_no_out_folder(tmp_path) -> None:
    out_dir = tmp_path / "runs" / "mine"
    config = CONFIG.with_fields({"faults.timeout_s": 2.0, "faults.retry_timeout_s": 1.0})
    with pytest.raises(ShardUnavailableError):
        watch_shards(config, ["tcp://127.0.0.1:1"], out_dir=str(out_dir))
    assert not (tmp_path / "runs").exists()


def test_watch_ends_cleanly_when_the_shards_stop(tmp_path) -> None:
    process, address = start_shard(0, 1)
    stop_later = threading.Timer(2.0, stop_processes, args=([process],))
    try:
        _initialise([address], seed=0)
        stop_later.start()
        config = CONFIG.with_fields({"faults.timeout_s": 2.0, "faults.retry_timeout_s": 1.0})
        result = watch_shards(config, [address], out_dir=str(tmp_path))
    finally:
        stop_later.cancel()
        stop_processes([process])
    assert set(result) == {"test_loss", "test_accuracy", "version"}
    assert [r["role"] for r in read_metrics(tmp_path / "metrics.csv")] == ["evaluator"]


@pytest.mark.timeout(300)
def test_ctrl_c_stops_an_eval_retrying_shards_that_are_down_at_once() -> None:
    """Ctrl-C while ``eval`` retries shards nobody serves: one line and exit 130 at once, not
    once the other shards' retries (up to --retry-timeout) have run out. (A watch without
    --once makes the same evaluator, whose handshake is what retries.)"""
    addresses = ",".join(f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    evaluator = subprocess.Popen(
        [*CLI, "eval", "--ps", addresses, "--retry-timeout", "240", "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        assert evaluator.stderr is not None
        seen = []
        while not any("retrying" in line for line in seen):  # it reached the retries
            line = evaluator.stderr.readline()
            assert line, "".join(seen)[-2000:]
            seen.append(line)
        time.sleep(1.0)  # both shards' hellos are retrying now
        interrupted = time.monotonic()
        evaluator.send_signal(signal.SIGINT)
        _, stderr = evaluator.communicate(timeout=120)
        took_s = time.monotonic() - interrupted
    finally:
        if evaluator.poll() is None:
            evaluator.kill()
            evaluator.communicate(timeout=10)
    assert evaluator.returncode == 130, stderr[-2000:]
    assert took_s < 60, took_s  # not the 240 s of the retries
    assert stderr.strip().splitlines()[-1] == "distbelief eval: interrupted", stderr[-2000:]
    assert "Traceback" not in stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_watch_whose_shard_hangs_fails_with_one_line(tmp_path, transport) -> None:
    """A shard that stops answering without exiting (stopped with SIGSTOP) is not a job that
    ended: the watch fails, one line and exit 1, and keeps the rows it appended. Over shared
    memory too, where an evaluation reads the parameters without asking the shard."""
    process, address = start_shard(0, 1)
    out = str(tmp_path)
    try:
        _initialise([address], seed=0)
        watch_flags = ["--eval-every", "0.2", "--timeout", "5", "--retry-timeout", "5"]
        watcher = subprocess.Popen(
            [*CLI, "eval", "--ps", address, *watch_flags, "--transport", transport, "--out", out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
        )
        try:
            _wait_for_rows(tmp_path / "metrics.csv", 1, timeout_s=60)
            pause_process(process.pid)
            stdout, stderr = watcher.communicate(timeout=120)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.communicate(timeout=10)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        stop_processes([process])
    assert watcher.returncode == 1, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("distbelief eval:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert errors[0].startswith(f"distbelief eval: ShardTimeoutError: shard 0 ({address})")
    assert "still there but not answering (last evaluation: test_loss=" in errors[0], errors
    assert stdout == ""
    assert [r["role"] for r in read_metrics(tmp_path / "metrics.csv")] == ["evaluator"]


@pytest.mark.timeout(300)
def test_eval_once_on_shards_of_a_click_job_that_stores_some_tables_by_row(shard_cluster):
    [address] = shard_cluster(1)
    click_job = ["--model", "dlrm", "--dataset", "synthetic-ctr", "--table-size", "200"]
    tables = ["--tables", "tables.0,tables.1"]
    worker = run_forked(
        *("worker", "--ps", address, "--rank", "0", "--num-workers", "1"),
        *click_job,
        *tables,
        *("--steps", "3", "--batch-size", "32"),
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    result = run_forked("eval", "--ps", address, *click_job, *tables, "--once", timeout_s=120)
    assert result.returncode == 0, result.stderr[-2000:]
    fields = dict(part.split("=") for part in result.stdout.split())
    assert fields["version"] == "3" and 0.0 <= float(fields["test_auc"]) <= 1.0
    # The tables hold 200 rows: another --table-size would fold the ids onto other rows.
    other_size = [*click_job[:-1], "300"]
    refused = run_forked("eval", "--ps", address, *other_size, *tables, "--once", timeout_s=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("distbelief eval: error: shard 0"), refused.stderr
    assert line.endswith(
        "table tables.0 holds 200 rows on shard 0, not 300: give the job's --table-size"
    )


def _write_movielens(data_dir: Path, num_users: int) -> None:
    """A ratings file of ``num_users`` users (ids 0 .. num_users - 1) rating 5 movies."""
    (data_dir / "movielens").mkdir(parents=True)
    lines = (
        f"{u}::{m}::{1 + (u + m) % 5}::{u * 5 + m}\n" for u in range(num_users) for m in range(5)
    )
    (data_dir / "movielens" / "ratings.dat").write_text("".join(lines))


@pytest.mark.timeout(300)
def test_eval_with_another_movielens_data_dir_is_told_to_give_the_jobs(shard_cluster, tmp_path):
    # A movielens table has as many rows as its data's largest id + 1: another --data-dir,
    # not another --table-size (refused for movielens), is what gives it another size.
    [address] = shard_cluster(1)
    _write_movielens(tmp_path / "job", num_users=8)
    _write_movielens(tmp_path / "other", num_users=11)
    job = ["--model", "dlrm", "--dataset", "movielens", "--tables", "tables.0,tables.1"]
    worker = run_forked(
        *("worker", "--ps", address, "--rank", "0", "--num-workers", "1"),
        *job,
        *("--data-dir", str(tmp_path / "job"), "--steps", "2", "--batch-size", "8"),
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    other = ["--data-dir", str(tmp_path / "other")]
    refused = run_forked("eval", "--ps", address, *job, *other, "--once", timeout_s=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("distbelief eval: error: shard 0"), refused.stderr
    assert "table tables.0 holds 8 rows on shard 0, not 11: movielens sizes its tables" in line
    assert line.endswith(f"(this process read {tmp_path / 'other'}): give the job's --data-dir")
    assert "--table-size" not in line and "Traceback" not in refused.stderr


@pytest.mark.timeout(300)
def test_eval_and_worker_with_another_embedding_dim_are_told_to_give_the_jobs(shard_cluster):
    # A table's row width is the model's --embedding-dim: another one is told that flag.
    [address] = shard_cluster(1)
    click_job = ["--model", "dlrm", "--dataset", "synthetic-ctr", "--table-size", "200"]
    tables = ["--tables", "tables.0,tables.1"]
    worker = ["worker", "--ps", address, "--rank", "0", "--num-workers", "1", "--steps", "2"]
    trained = run_forked(*worker, *click_job, *tables, "--batch-size", "32")
    assert trained.returncode == 0, trained.stderr[-2000:]
    other_width = [*click_job, *tables, "--embedding-dim", "8"]
    for command, name in ((worker, "worker"), (["eval", "--ps", address, "--once"], "eval")):
        refused = run_forked(*command, *other_width, timeout_s=120)
        assert refused.returncode == 2, refused.stderr[-2000:]
        [line] = refused.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"distbelief {name}: error: shard 0"), refused.stderr
        assert "table tables.0 holds rows of 16 values on shard 0, not 8" in line
        assert line.endswith("give the job's --embedding-dim"), line
        assert "--model" not in line and "Traceback" not in refused.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["eval", "worker"])
def test_a_click_process_refused_by_another_jobs_shards_leaves_them_no_tables(
    shard_cluster, command
):
    # Tables a refused evaluator or worker declared would stay on the shards and go into
    # their checkpoints, which --resume of that job would then refuse as another model's.
    addresses = shard_cluster(1)
    _initialise(addresses, seed=0)  # a lenet job's shards
    click_job = ["--model", "dlrm", "--dataset", "synthetic-ctr", "--table-size", "200"]
    role = {
        "eval": ["eval", "--ps", addresses[0], "--once"],
        "worker": ["worker", "--ps", addresses[0], "--rank", "0", "--num-workers", "1"],
    }[command]
    steps = ["--steps", "2"] if command == "worker" else []
    refused = run_forked(*role, *click_job, *steps, timeout_s=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"distbelief {command}: error: "), refused.stderr[-2000:]
    assert "does not match the shards'" in line
    reader = RowClient(addresses, {"tables.0": 16})
    try:
        [described] = reader.stats()
    finally:
        reader.close()
    assert described["tables"] == {}


def test_an_evaluations_version_is_the_lowest_of_its_shards():
    """A shard restarted from an old checkpoint after the workers finished holds none of the
    updates since: an evaluation said the highest shard version, and summary.json's final
    named every update the job made while half the model had lost them."""
    from distbelief.evaluator.ps import GroupReader

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    named = list(model.named_parameters())
    specs = tensor_specs(named)
    with served_shards(2) as (shards, addresses):
        writer = ParameterServerClient(addresses, specs, timeout_s=30, retry_timeout_s=0)
        try:
            writer.handshake(FlatLayout(specs).allocate())
        finally:
            writer.close()
        for _ in range(3):  # shard 1 applies updates that shard 0 never saw
            shards[1].apply_gradient([torch.zeros_like(t) for t in shards[1].parameters()])
        reader = GroupReader(JobConfig(), addresses, named, "", None)
        try:
            with torch.no_grad():  # as the evaluator pulls
                assert reader.pull() == 0
        finally:
            reader.client.close()


def test_an_eval_against_shards_no_worker_initialised_says_what_it_waits_for() -> None:
    """It waited the request timeout without a word, then named neither the wait nor what
    bounds it."""
    process, address = start_shard(0, 1)
    try:
        result = subprocess.run(
            [*CLI, "eval", "--ps", address, "--once", "--timeout", "2"],
            capture_output=True,
            text=True,
            env=CHILD_ENV,
            timeout=120,
        )
    finally:
        stop_processes([process])
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert f"shard 0 ({address}) holds no parameters yet: waiting up to 2s" in result.stderr
    assert lines[-1] == (
        f"distbelief eval: ShardTimeoutError: shard 0 ({address}): no worker initialised it "
        "within 2s (the request timeout: --timeout)"
    )
