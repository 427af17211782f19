"""Pins the command line: a flag added, renamed or dropped, or pointed at another config field,
must show up here on purpose. Also: flags land in their fields, and --help loads no torch."""

import argparse
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distbelief.config import JobConfig
from distbelief.errors import BindError, ConsistencyMismatchError, NotAStageError, UnknownOpError
from distbelief.launch import cli
from distbelief.launch.cli import config_from_args, main, parse_args
from distbelief.launch.console import Terminated
from distbelief.launch.flags import command_flags, field_docs, flag_of, get_args_parser
from tests.conftest import run_main

TRAINING = {
    "--threads": "cluster.threads_per_worker",
    "--device": "cluster.device",
    "--worker-host": "cluster.worker_host",
    "--dataset": "data.name",
    "--data-dir": "data.data_dir",
    "--no-download": "data.download",
    "--model": "model.name",
    "--seed": "model.seed",
    "--embedding-dim": "model.embedding_dim",
    "--table-size": "data.table_size",
    "--lr": "optimizer.lr",
    "--n-push": "optimizer.n_push",
    "--n-pull": "optimizer.n_pull",
    "--batch-size": "optimizer.batch_size",
    "--steps": "optimizer.steps",
    "--epochs": "optimizer.epochs",
    "--blocking": "optimizer.blocking",
    "--warmstart-steps": "optimizer.warmstart_steps",
    "--wire-dtype": "optimizer.wire_dtype",
    "--push-compression": "optimizer.push_compression",
    "--timeout": "faults.timeout_s",
    "--retry-timeout": "faults.retry_timeout_s",
}
SERVER = {
    "--server-optimizer": "server.optimizer",
    "--server-lr": "server.lr",
    "--server-momentum": "server.momentum",
    "--server-betas": "server.betas",
    "--server-eps": "server.eps",
    "--checkpoint-every": "server.checkpoint_every_s",
    "--server-design": "server.design",
    "--max-connections": "server.max_connections",
    "--server-threads": "server.threads",
    "--sync": "consistency.sync",
    "--backup-workers": "consistency.backup_workers",
    "--max-staleness": "consistency.max_staleness",
    "--staleness-policy": "consistency.staleness_policy",
    "--dc-lambda": "consistency.dc_lambda",
    "--liveness-timeout": "consistency.liveness_timeout_s",
}
PIPELINE = {
    "--partitions": "pipeline.num_partitions",
    "--micro-batches": "pipeline.num_micro_batches",
    "--schedule": "pipeline.schedule",
    "--split-points": "pipeline.split_points",
    "--max-stage-bytes": "pipeline.max_stage_bytes",
}
ROW_SERVER = {
    "--row-optimizer": "embeddings.row_optimizer",
    "--row-lr": "embeddings.row_lr",
    "--admit-after": "embeddings.admit_after",
    "--max-rows-per-shard": "embeddings.max_rows_per_shard",
    "--row-ttl-steps": "embeddings.row_ttl_steps",
    "--row-init-std": "embeddings.row_init_std",
}
ROW_WORKER = {"--tables": "embeddings.tables", "--row-cache-mb": "embeddings.row_cache_mb"}
CLIENT_SECURITY = {"--auth-key-file": "auth_key_file", "--tls-ca": "tls_ca"}
TRANSPORT = {"--transport": "cluster.transport"}
EXPECTED = {
    "train": TRAINING
    | SERVER
    | PIPELINE
    | ROW_SERVER
    | ROW_WORKER
    | TRANSPORT
    | {
        "--workers": "cluster.num_workers",
        "--shards": "cluster.num_shards",
        "--shard-hosts": "cluster.shard_hosts",
        "--cluster": "cluster.engine",
        "--ray-address": "cluster.ray_address",
        "--max-restarts": "faults.max_restarts",
        "--out": "reporting.out_dir",
        "--eval-every": "reporting.eval_every_s",
        "--no-eval": "reporting.eval_during_training",
        "--eval": "reporting.eval_during_training",
        "--no-plots": "reporting.draw_plots",
        "--plots": "reporting.draw_plots",
        "--resume": "resume",
        "--algorithm": "optimizer.algorithm",
        "--history": "sandblaster.history",
        "--portions": "sandblaster.portions",
        "--line-search": "sandblaster.line_search",
        "--max-iterations": "sandblaster.max_iterations",
        "--max-evaluations": "sandblaster.max_evaluations",
        "--step-size": "sandblaster.step_size",
        "--portions-per-push": "sandblaster.portions_per_push",
        "--no-backup-tasks": "sandblaster.backup_tasks",
    },
    "ps": SERVER
    | ROW_SERVER
    | TRANSPORT
    | {
        "--num-shards": "cluster.num_shards",
        "--num-workers": "cluster.num_workers",
        "--shard-id": "shard_id",
        "--bind": "bind",
        "--checkpoint-dir": "checkpoint_dir",
        "--auth-key-file": "auth_key_file",
        "--no-auth": "no_auth",
        "--tls-cert": "tls_cert",
        "--tls-key": "tls_key",
    },
    "worker": TRAINING
    | PIPELINE
    | ROW_WORKER
    | CLIENT_SECURITY
    | TRANSPORT
    | {
        "--num-workers": "cluster.num_workers",
        "--ps": "ps",
        "--rank": "rank",
        "--stage": "stage",
        "--bind": "bind",
        "--next": "next",
    },
    "eval": {
        flag: TRAINING[flag]
        for flag in (
            "--dataset",
            "--data-dir",
            "--no-download",
            "--model",
            "--seed",
            "--embedding-dim",
            "--table-size",
            "--timeout",
            "--retry-timeout",
        )
    }
    | CLIENT_SECURITY
    | TRANSPORT
    | {
        "--partitions": "pipeline.num_partitions",
        "--split-points": "pipeline.split_points",
        "--tables": "embeddings.tables",
        "--eval-every": "reporting.eval_every_s",
        "--out": "reporting.out_dir",
        "--ps": "ps",
        "--once": "once",
    },
    "plot": {"--out": "out_dir"},
    "keygen": {},
    "reshard": {"--shards": "cluster.num_shards"},
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(
        action
        for action in get_args_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return action.choices


def test_no_unplanned_flags_and_each_sets_its_field():
    actual = {
        name: {
            flag: action.dest
            for action in parser._actions
            for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"
        }
        for name, parser in _subparsers().items()
    }
    # -v/--verbose also comes after any command (`distbelief train -v`), as before it.
    assert actual == {name: {**flags, "--verbose": "verbose"} for name, flags in EXPECTED.items()}


@pytest.mark.parametrize("command", ["train", "ps", "worker", "eval"])
def test_flag_of_inverts_command_flags(command):
    flags = command_flags(command)
    # --eval and --plots are second flags of the fields --no-eval and --no-plots set (each
    # turns its field back on).
    second = {"--eval", "--plots"}
    expected = {f: dest for f, dest in EXPECTED[command].items() if "." in dest and f not in second}
    assert flags == expected
    assert all(flag_of(command, path) == flag for flag, path in flags.items())


def test_every_config_field_and_section_has_a_docstring():
    paths = set(JobConfig().to_fields())
    sections = {path.partition(".")[0] for path in paths}
    docs = field_docs()
    assert paths | sections <= set(docs)
    assert all(docs[name] for name in paths | sections)


def test_no_flags_give_the_default_config():
    assert config_from_args(parse_args(["train"])) == JobConfig()


SHARED_ARGV = [
    *(
        "--workers",
        "3",
        "--shards",
        "4",
        "--threads",
        "2",
        "--transport",
        "tcp",
        "--dataset",
        "mnist",
    ),
    *("--data-dir", "/d", "--no-download", "--model", "mlp", "--seed", "7"),
    *("--batch-size", "8", "--checkpoint-every", "5", "--timeout", "11"),
    *("--retry-timeout", "12", "--max-restarts", "0", "--out", "/o"),
    *("--no-eval", "--no-plots", "--server-design", "threads"),
    *("--max-connections", "100", "--server-threads", "2"),
]
DOWNPOUR_ARGV = [
    *("--shard-hosts", "127.0.0.2,127.0.0.3", "--worker-host", "127.0.0.4"),
    *("--lr", "0.5", "--n-push", "2", "--n-pull", "3"),
    *("--steps", "9", "--blocking", "--warmstart-steps", "1"),
    *("--wire-dtype", "bf16", "--push-compression", "topk:0.01"),
    *("--server-optimizer", "adam", "--server-lr", "0.2"),
    *("--server-betas", "0.8,0.9", "--server-eps", "1e-6"),
    *("--max-staleness", "4", "--staleness-policy", "scale", "--liveness-timeout", "6"),
    *("--partitions", "2", "--micro-batches", "4", "--schedule", "gpipe"),
    *("--split-points", "3", "--max-stage-bytes", "1000000"),
]
# Flags that only apply beside others (and are refused without them), each set on its own.
SYNC_ARGV = ["--workers", "3", "--sync", "--backup-workers", "1"]
DC_ASGD_ARGV = ["--staleness-policy", "dc-asgd", "--dc-lambda", "0.1"]
MOMENTUM_ARGV = ["--server-optimizer", "momentum", "--server-momentum", "0.5"]
LIVE_EVAL_ARGV = ["--eval-every", "0.5"]
CLICK_ARGV = [
    *("--model", "dlrm", "--dataset", "synthetic-ctr", "--table-size", "100"),
    *("--tables", "tables.0,tables.1", "--row-optimizer", "adam", "--row-lr", "0.1"),
    *("--admit-after", "2", "--max-rows-per-shard", "1000", "--row-ttl-steps", "50"),
    *("--row-init-std", "0.1", "--row-cache-mb", "8", "--embedding-dim", "8"),
]
SANDBLASTER_ARGV = [
    *("--algorithm", "sandblaster", "--history", "4", "--portions", "7"),
    *("--line-search", "fixed", "--max-iterations", "3", "--max-evaluations", "5"),
    *("--step-size", "0.5"),
    *("--portions-per-push", "3", "--no-backup-tasks"),
    *("--cluster", "ray", "--ray-address", "head:6379"),
]


def _changed_fields(argv: list[str]) -> set[str]:
    fields = config_from_args(parse_args(["train", *argv])).to_fields()
    defaults = JobConfig().to_fields()
    return {path for path, value in fields.items() if value != defaults[path]}


def test_every_train_flag_reaches_its_field():
    downpour = config_from_args(parse_args(["train", *SHARED_ARGV, *DOWNPOUR_ARGV]))
    changed = _changed_fields([*SHARED_ARGV, *DOWNPOUR_ARGV])
    changed |= _changed_fields([*SHARED_ARGV, *SANDBLASTER_ARGV])
    for argv in (SYNC_ARGV, DC_ASGD_ARGV, MOMENTUM_ARGV, CLICK_ARGV, LIVE_EVAL_ARGV):
        changed |= _changed_fields(argv)
    # Every field with a train flag was changed by it, but for one that excludes another and is
    # checked on its own (--epochs: --steps); the rest kept defaults.
    # --device: a GPU trains whole replicas, not the partitions of DOWNPOUR_ARGV.
    alone = {"optimizer.epochs", "cluster.device"}
    assert changed == set(command_flags("train").values()) - alone
    assert config_from_args(parse_args(["train", "--epochs", "2"])).optimizer.epochs == 2
    assert config_from_args(parse_args(["train", "--device", "cuda:1"])).cluster.device == "cuda:1"
    click = config_from_args(parse_args(["train", *CLICK_ARGV]))
    assert click.data.table_size == 100
    assert click.embeddings.tables == ("tables.0", "tables.1")
    assert downpour.server.betas == (0.8, 0.9)
    assert downpour.pipeline.split_points == (3,)
    assert downpour.cluster.shard_hosts == ("127.0.0.2", "127.0.0.3")
    shard_hosts = [downpour.cluster.shard_host(i) for i in range(3)]
    assert shard_hosts == ["127.0.0.2", "127.0.0.3", "127.0.0.2"]
    assert (downpour.data.download, downpour.reporting.eval_during_training) == (False, False)
    assert not downpour.reporting.draw_plots


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--history", "3"], "argument --history: only applies to algorithm sandblaster"),
        (
            ["--cluster", "ray", "--shard-hosts", "127.0.0.2"],
            "argument --shard-hosts: does not apply with the ray engine (shards bind to",
        ),
        (
            ["--cluster", "ray", "--worker-host", "127.0.0.2"],
            "argument --worker-host: does not apply with the ray engine (workers connect from",
        ),
        (
            ["--algorithm", "sandblaster", "--n-push", "2"],
            "argument --n-push: only applies to algorithm downpour",
        ),
        (
            ["--algorithm", "sandblaster", "--push-compression", "topk:0.1"],
            "argument --push-compression: only applies to algorithm downpour",
        ),
        (
            ["--algorithm", "sandblaster", "--device", "cuda"],
            "argument --device: only applies to algorithm downpour",
        ),
        # Not "only applies to server optimizer momentum" (or partitioned replicas): that flag
        # is refused here too, at its default value as at another.
        (
            ["--algorithm", "sandblaster", "--micro-batches", "1"],
            "argument --micro-batches: only applies to algorithm downpour, not sandblaster",
        ),
        (
            ["--algorithm", "sandblaster", "--server-momentum", "0.9"],
            "argument --server-momentum: only applies to algorithm downpour, not sandblaster",
        ),
        (
            ["--algorithm", "sandblaster", "--server-momentum", "0.5"],
            "argument --server-momentum: only applies to algorithm downpour, not sandblaster",
        ),
        (
            ["--algorithm", "sandblaster", "--backup-workers", "1"],
            "argument --backup-workers: only applies to algorithm downpour, not sandblaster",
        ),
        (
            ["--algorithm", "sandblaster", "--dc-lambda", "0.1"],
            "argument --dc-lambda: only applies to algorithm downpour, not sandblaster",
        ),
        # Typed at their default values, they would be ignored just as silently.
        (
            ["--portions-per-push", "2"],
            "argument --portions-per-push: only applies to algorithm sandblaster",
        ),
        (
            ["--algorithm", "sandblaster", "--server-optimizer", "sgd"],
            "argument --server-optimizer: only applies to algorithm downpour",
        ),
        (
            ["--algorithm", "sandblaster", "--n-pull", "1"],
            "argument --n-pull: only applies to algorithm downpour",
        ),
        (
            ["--no-eval", "--eval-every", "1"],
            "argument --eval-every: not used with --no-eval",
        ),
        (["--push-compression", "top:1"], "argument --push-compression: must be none or topk:F"),
        (["--device", "gpu0"], "argument --device: must be cpu, cuda or cuda:N, got 'gpu0'"),
        (
            ["--device", "cuda", "--partitions", "2"],
            "argument --device: must be cpu with 2 partitions per replica",
        ),
        (
            ["--device", "cuda", "--model", "dlrm", "--dataset", "synthetic-ctr"],
            "argument --device: must be cpu for model dlrm",
        ),
        (
            ["--model", "dlrm", "--dataset", "synthetic-ctr", "--tables", "tables.0,tables.0"],
            "argument --tables: names 'tables.0' twice",
        ),
    ],
)
def test_a_flag_of_the_other_algorithm_is_refused(argv, message, capsys, tmp_path):
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_resume_takes_a_kept_flag_typed_with_the_runs_own_value(tmp_path, monkeypatch):
    """The run's command typed again with --resume added was refused at its first flag
    (``--dataset digits``: a resumed run keeps the value), though it changed nothing."""
    from distbelief.launch import cli as cli_module

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = JobConfig.from_fields({"model.name": "mlp", "optimizer.lr": 0.1})
    (run_dir / "config.json").write_text(config.to_json())
    resumed = []
    monkeypatch.setattr(cli_module, "_resumed_config_with", lambda args, changes: changes)
    monkeypatch.setattr(cli_module, "_train_and_report", lambda args, job: resumed.append(job))
    argv = ["train", "--resume", str(run_dir), "--model", "mlp", "--dataset", "digits"]
    main([*argv, "--lr", "0.1", "--timeout", "45"])
    assert resumed == [{"faults.timeout_s": 45.0}]  # what the resume changes


@pytest.mark.parametrize(
    ("algorithm", "argv", "message"),
    [
        ("sandblaster", ["--steps", "5"], "argument --steps: only applies to algorithm downpour"),
        ("sandblaster", ["--lr", "0.1"], "argument --lr: only applies to algorithm downpour"),
        (
            "downpour",
            ["--history", "3"],
            "argument --history: only applies to algorithm sandblaster",
        ),
        # A budget a resume may raise, of the other algorithm: the config refused it.
        (
            "downpour",
            ["--max-iterations", "5"],
            "argument --max-iterations: only applies to algorithm sandblaster",
        ),
        # A flag both algorithms use: the run's value stands.
        ("sandblaster", ["--workers", "3"], "argument --workers: a resumed run keeps the value"),
        # The algorithm typed too: it is what the resume refuses, not the other's flag.
        (
            "downpour",
            ["--history", "3", "--algorithm", "sandblaster"],
            "argument --algorithm: a resumed run keeps the value",
        ),
    ],
)
def test_a_resume_refuses_a_flag_of_the_other_algorithm_as_a_new_run_does(
    algorithm, argv, message, capsys, tmp_path
):
    # Not "a resumed run keeps the value": the run has no such value; --steps would not
    # extend a Sandblaster run (--max-iterations does).
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = JobConfig.from_fields({"optimizer.algorithm": algorithm})
    (run_dir / "config.json").write_text(config.to_json())
    assert main(["train", "--resume", str(run_dir), *argv]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert message in line, line
    if "only applies" in message:
        assert line.endswith(f"; as {run_dir / 'config.json'} has it"), line
    assert [path.name for path in run_dir.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    ("flag", "text"), [("--tables", "tables.0,,tables.1"), ("--shard-hosts", "127.0.0.2,")]
)
def test_a_slip_in_a_list_is_refused_not_skipped(flag, text, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", flag, text, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert f"argument {flag}: has an empty item in the list {text!r}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_slip_in_the_list_of_shards_is_refused_not_skipped(capsys):
    listed = "tcp://127.0.0.9:1,,tcp://127.0.0.9:2"
    assert main(["eval", "--ps", listed, "--once"]) == 2
    assert f"argument --ps: the list {listed!r} has an empty item" in capsys.readouterr().err


_CLICKS = ["--model", "dlrm", "--dataset", "synthetic-ctr", "--steps", "3"]
_WORKER = ["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"]


def test_tables_left_dense_are_refused_by_the_memory_they_take_together(capsys, tmp_path):
    """Each of the 25 tables left dense fits this machine's memory alone, not all of them."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = min(memory // (2 * 16 * 4), 2**31)  # half the memory per table, at width 16
    argv = ["train", *_CLICKS, "--table-size", str(rows), "--tables", "tables.0"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "argument --tables: leaves 25 tables (tables.1, ...)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--algorithm", "sandblaster", "--model", "mlp", "--step-size", "inf"],
            "argument --step-size: must be a finite number > 0, got inf",
        ),
        (["train", *_CLICKS, "--row-lr", "inf"], "argument --row-lr: must be a finite number"),
        (["train", *_CLICKS, "--row-init-std", "inf"], "argument --row-init-std: must be"),
        (["train", *_CLICKS, "--row-cache-mb", "inf"], "argument --row-cache-mb: must be"),
        (["train", "--liveness-timeout", "inf"], "argument --liveness-timeout: must be"),
        (["train", "--lr", "1e308"], "argument --lr: must be <= 3.40282e+38, got 1e308"),
        (["train", "--server-lr", "1e308"], "argument --server-lr: must be <= 3.40282e+38"),
        (["train", "--timeout", "1e308"], "argument --timeout: must be <= 604800, got 1e308"),
        # A whole bound in full: it said 1.07374e+09, which 1073741825 looked under.
        (
            [
                "train",
                "--model",
                "dlrm",
                "--dataset",
                "synthetic-ctr",
                "--row-cache-mb",
                "1073741825",
            ],
            "argument --row-cache-mb: must be <= 1073741824, got 1073741825",
        ),
        (["train", "--retry-timeout", "1e308"], "argument --retry-timeout: must be <= 604800"),
        # The number as typed, not as parsed (0.0, inf).
        (["train", "--timeout", "0"], "argument --timeout: must be a finite number > 0, got 0"),
        (
            ["train", "--timeout=1e309"],
            "argument --timeout: must be a finite number > 0, got 1e309",
        ),
        (
            ["train", "--lr", "-1", "--lr", "-0.50"],
            "argument --lr: must be a finite number >= 0, got -0.50",
        ),
        (
            ["ps", "--shard-id", "0", "--num-shards", "1", "--no-auth", "--row-lr", "inf"],
            "argument --row-lr: must be a finite number >= 0, got inf",
        ),
        (
            ["train", *_CLICKS, "--workers", "1", "--shards", "1", "--tables", "tables.99"],
            "argument --tables: the dlrm model of synthetic-ctr has no table 'tables.99' "
            "(it has tables.0 .. tables.25)",
        ),
        (
            [*_WORKER, "--model", "dlrm", "--dataset", "movielens", "--tables", "tables.2"],
            "argument --tables: the dlrm model of movielens has no table 'tables.2'",
        ),
        (
            ["train", "--model", "mlp", "--embedding-dim", "8", "--steps", "2"],
            "argument --embedding-dim: only applies to model dlrm, not 'mlp'",
        ),
        (
            [
                *("eval", "--ps", "tcp://127.0.0.1:1", "--once", "--model", "mlp"),
                "--embedding-dim",
                "8",
            ],
            "argument --embedding-dim: only applies to model dlrm, not 'mlp'",
        ),
        (
            # Wider than a shard's rows: refused here, not by the shards once all has started.
            ["train", *_CLICKS, "--workers", "1", "--shards", "1", "--embedding-dim", "65537"],
            "argument --embedding-dim: must be <= 65536 (the widest row a shard holds), got 65537",
        ),
        (
            [
                *("eval", "--ps", "tcp://127.0.0.1:1", "--once", "--model", "dlrm"),
                *("--dataset", "synthetic-ctr", "--embedding-dim", "70000"),
            ],
            "argument --embedding-dim: must be <= 65536 (the widest row a shard holds), got 70000",
        ),
        (
            # The table left out would be a dense parameter of 2**32 + 1 rows (256 GiB): the
            # worker would fail allocating it once started.
            [*("train", "--model", "dlrm", "--dataset", "criteo"), "--tables", "tables.0"],
            "argument --tables: leaves tables.1 a dense parameter of criteo's raw ids (4294967297 "
            "rows x 16 values x 4 bytes: 256 GiB",
        ),
        (
            [*_WORKER, "--model", "dlrm", "--dataset", "criteo", "--tables", "tables.0,tables.1"],
            "argument --tables: leaves tables.2 a dense parameter of criteo's raw ids",
        ),
        (
            # 8 TiB: the evaluator failed allocating it, exit 1 with a traceback.
            [
                *("train", *_CLICKS, "--table-size", "2147483648", "--tables", "tables.0"),
                *("--embedding-dim", "1024"),
            ],
            "argument --tables: leaves 25 tables (tables.1, ...) a dense parameter of "
            "2147483648 rows x 1024 values x 4 bytes (204800 GiB on every worker, more than "
            "this machine's",
        ),
    ],
    ids=[
        *("step-size", "row-lr", "row-init-std", "row-cache-mb", "liveness-timeout"),
        *("lr-1e308", "server-lr-1e308", "timeout-1e308", "row-cache-mb-past-2**30"),
        "retry-timeout-1e308",
        *("timeout-0", "timeout-1e309", "lr-typed-twice", "ps"),
        *("tables", "worker-tables", "embedding-dim", "eval-embedding-dim"),
        *("embedding-dim-wider-than-a-row", "eval-embedding-dim-wider-than-a-row"),
        *("criteo-raw-table-left-dense", "worker-criteo-raw-table-left-dense"),
        "synthetic-table-left-dense-past-memory",
    ],
)
def test_a_bad_row_or_float_setting_is_refused_in_one_line(argv, message, capsys, tmp_path):
    out = ["--out", str(tmp_path / "run")] if argv[0] == "train" else []
    assert main([*argv, *out]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [*_WORKER, "--partitions", "2", "--next", "tcp://127.0.0.1:1"],
            "--stage is required with --partitions 2 (the partition this process runs, in [0, 2))",
        ),
        (
            [
                *_WORKER,
                *("--partitions", "2", "--stage", "0", "--next", "tcp://127.0.0.1:1"),
                *("--bind", "tcp://127.0.0.1:0"),
            ],
            "--bind tcp://127.0.0.1:0: the first stage does not listen (it dials --next)",
        ),
        (
            [*_WORKER, "--bind", "tcp://127.0.0.1:0"],
            "--bind tcp://127.0.0.1:0: only applies to a stage of a partitioned replica",
        ),
        (
            [*_WORKER, "--schedule", "gpipe"],
            "argument --schedule: only applies to partitioned replicas (partitions > 1), got gpipe",
        ),
        (
            ["train", "--schedule", "gpipe", "--steps", "1"],
            "argument --schedule: only applies to partitioned replicas (partitions > 1), got gpipe",
        ),
        # The default schedule, typed: refused as well (it would be ignored without a word),
        # in the same words; so is the default number of micro-batches.
        (
            [*_WORKER, "--schedule", "1f1b"],
            "argument --schedule: only applies to partitioned replicas (partitions > 1), got 1f1b",
        ),
        (
            ["train", "--schedule", "1f1b", "--partitions", "1"],
            "argument --schedule: only applies to partitioned replicas (partitions > 1), got 1f1b",
        ),
        (
            ["train", "--micro-batches", "1", "--steps", "1"],
            "argument --micro-batches: only applies to partitioned replicas (partitions > 1), "
            "got 1",
        ),
    ],
    ids=[
        *("no-stage", "bind-on-stage-0", "bind-without-partitions", "worker-schedule"),
        *("schedule", "worker-default-schedule", "default-schedule", "default-micro-batches"),
    ],
)
def test_a_stage_flag_no_stage_uses_is_refused_in_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")] if argv[0] == "train" else argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "run").exists()


# Port 0: the default 7000 may be another program's on a shared machine (--bind is checked
# first). --no-auth last: a test replaces it.
_PS = ["ps", "--shard-id", "0", "--num-shards", "1", "--bind", "tcp://127.0.0.1:0", "--no-auth"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--server-optimizer", "sgd", "--server-momentum", "0.5"],
            "argument --server-momentum: only applies to server optimizer momentum, not 'sgd'",
        ),
        (
            ["train", "--server-betas", "0.9,0.99"],
            "argument --server-betas: only applies to server optimizer adam, not 'sgd'",
        ),
        (
            ["train", "--server-optimizer", "sgd", "--server-eps", "1e-6"],
            "argument --server-eps: only applies to server optimizer adagrad or adam, not 'sgd'",
        ),
        (
            [*_PS, "--server-optimizer", "adagrad", "--server-momentum", "0.5"],
            "argument --server-momentum: only applies to server optimizer momentum, not 'adagrad'",
        ),
        (
            [*_PS, "--server-optimizer", "momentum", "--server-eps", "1e-6"],
            "argument --server-eps: only applies to server optimizer adagrad or adam, "
            "not 'momentum'",
        ),
    ],
    ids=["train-momentum", "train-betas", "train-eps", "ps-momentum", "ps-eps"],
)
def test_a_server_optimizer_setting_the_optimizer_ignores_is_refused(
    argv, message, capsys, tmp_path
):
    assert main([*argv, "--out", str(tmp_path / "run")] if argv[0] == "train" else argv) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--liveness-timeout", "10"],
            "argument --liveness-timeout: only used with --sync or --max-staleness",
        ),
        (
            [*_PS, "--liveness-timeout", "3"],
            "argument --liveness-timeout: only used with --sync or --max-staleness",
        ),
        (["train", "--backup-workers", "0"], "argument --backup-workers: only used with --sync"),
        (
            [*_PS, "--dc-lambda", "0.04"],
            "argument --dc-lambda: only applies to staleness policy dc-asgd, not 'none'",
        ),
        (
            ["train", "--server-momentum", "0.9"],
            "argument --server-momentum: only applies to server optimizer momentum, not 'sgd'",
        ),
        (
            [*_PS, "--server-optimizer", "momentum", "--server-betas", "0.9,0.999"],
            "argument --server-betas: only applies to server optimizer adam, not 'momentum'",
        ),
    ],
    ids=["train-liveness", "ps-liveness", "backup-workers", "dc-lambda", "momentum", "betas"],
)
def test_a_flag_that_does_nothing_is_refused_even_at_its_default(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")] if argv[0] == "train" else argv) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [*_PS, "--sync", "--num-workers", "2", "--liveness-timeout", "3"],
        [*_PS, "--max-staleness", "0", "--liveness-timeout", "3"],
        [*_PS, "--sync", "--num-workers", "2", "--backup-workers", "0"],
        ["train", "--staleness-policy", "dc-asgd", "--dc-lambda", "0.04"],
        ["train", "--partitions", "2", "--schedule", "1f1b"],
        ["train", "--server-optimizer", "momentum", "--server-momentum", "0.9"],
        [*_PS, "--server-optimizer", "adam", "--server-betas", "0.8,0.9", "--server-eps", "1e-6"],
        ["train", "--server-optimizer", "adagrad", "--server-eps", "1e-6"],
    ],
    ids=[
        *("sync", "ssp", "backup-workers", "dc-lambda", "schedule"),
        *("server-momentum", "server-adam", "server-adagrad-eps"),
    ],
)
def test_a_flag_given_with_the_one_it_needs_is_taken(argv):
    args = parse_args(argv)
    config = config_from_args(args).to_fields()
    assert all(config[path] == value for path, value in vars(args).items() if "." in path)


_MISMATCHES = [
    (
        ConsistencyMismatchError(
            "shard 0 (tcp://h:1) runs 2 but shard 1 (tcp://h:2) runs None: start every shard "
            "with the same consistency flags",
            "consistency.max_staleness",
        ),
        "distbelief worker: error: argument --max-staleness: shard 0 (tcp://h:1) runs 2 but "
        "shard 1 (tcp://h:2) runs None: start every shard with the same consistency flags",
    ),
    (
        ConsistencyMismatchError(
            "shard 0 (tcp://h:1) runs sync rounds of 2 workers, but this worker is one of 3",
            "cluster.num_workers",
        ),
        "distbelief worker: error: argument --num-workers: shard 0 (tcp://h:1) runs sync rounds "
        "of 2 workers, but this worker is one of 3",
    ),
    (
        ConsistencyMismatchError("shard 0 and shard 1 run different row settings"),
        "distbelief worker: error: shard 0 and shard 1 run different row settings",
    ),
]


@pytest.mark.parametrize(("raised", "said"), _MISMATCHES, ids=["staleness", "workers", "rows"])
def test_shards_that_disagree_are_a_usage_error_naming_the_flag(raised, said, monkeypatch, capsys):
    def refused(_args):
        raise raised

    monkeypatch.setitem(cli._COMMANDS, "worker", refused)
    assert main(_WORKER) == 2
    assert capsys.readouterr().err.strip().splitlines() == [said]


_WRONG_KIND_OF_SERVER = [
    (
        UnknownOpError("shard 0 (tcp://h:1): hello refused: unknown op HELLO"),
        "distbelief worker: error: argument --ps: shard 0 (tcp://h:1): hello refused: unknown op "
        "HELLO: give the shards' addresses",
    ),
    (
        NotAStageError("stage 0: tcp://h:1 is not a pipeline stage"),
        "distbelief worker: error: argument --next: stage 0: tcp://h:1 is not a pipeline stage",
    ),
]


@pytest.mark.parametrize(("raised", "said"), _WRONG_KIND_OF_SERVER, ids=["ps", "next"])
def test_an_address_of_another_kind_of_server_is_a_usage_error_naming_the_flag(
    raised, said, monkeypatch, capsys
):
    def refused(_args):
        raise raised

    monkeypatch.setitem(cli._COMMANDS, "worker", refused)
    assert main(_WORKER) == 2
    assert capsys.readouterr().err.strip().splitlines() == [said]


def test_a_consistency_mismatch_names_its_field_for_api_users_and_pickles():
    error = ConsistencyMismatchError("shard 0 runs 2 but shard 1 runs None", "consistency.sync")
    assert str(error) == "consistency.sync differs: shard 0 runs 2 but shard 1 runs None"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.problem, copy.field, str(copy)) == (error.problem, error.field, str(error))


_MINIMAL_ARGV = {
    "train": ["train"],
    "ps": ["ps", "--shard-id", "0", "--num-shards", "1"],
    "worker": _WORKER,
    "eval": ["eval", "--ps", "tcp://127.0.0.1:1"],
    "plot": ["plot", "somerun"],
    "reshard": ["reshard", "somerun", "--shards", "2"],
    "keygen": ["keygen", "somefile"],
}


@pytest.mark.parametrize("command", sorted(_MINIMAL_ARGV))
def test_an_unknown_flag_is_the_commands_error(command, capsys):
    assert set(_MINIMAL_ARGV) == set(_subparsers())  # every command is checked
    with pytest.raises(SystemExit) as exited:
        parse_args([*_MINIMAL_ARGV[command], "--bogus"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == f"distbelief {command}: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize(
    ("argv", "typed"),
    [
        (["train", "--work", "2"], "--work"),
        (["train", "--max-it=5"], "--max-it=5"),
        (["train", "--out", "somerun", "--ste", "3"], "--ste"),
        (["ps", "--shard", "0", "--num-shards", "1"], "--shard"),
        (["worker", "--ps", "tcp://127.0.0.1:1", "--ran", "0", "--num-workers", "1"], "--ran"),
        (["eval", "--ps", "tcp://127.0.0.1:1", "--on"], "--on"),
        (["--verb", "train"], "--verb"),
    ],
)
def test_an_abbreviated_flag_is_refused_as_typed(argv, typed, capsys):
    command = next(word for word in argv if not word.startswith("-"))
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == f"distbelief {command}: error: unrecognized arguments: {typed}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--server-optimizer", "adam", "--server-betas", "-0.1,0.9"],
            "argument --server-betas: must be two numbers in [0, 1), got (-0.1, 0.9)",
        ),
        (["train", "--lr", "-1e-3"], "argument --lr: must be a finite number >= 0, got -1e-3"),
        ([*_PS, "--server-lr", "-.5"], "argument --server-lr: must be a finite number >= 0"),
        # Another command's flag stays as typed (it was named "--workers=-1").
        (["ps", "--workers", "-1"], "distbelief ps: error: unrecognized arguments: --workers"),
    ],
)
def test_a_negative_value_of_a_flag_is_checked_as_its_value(argv, message, capsys, tmp_path):
    """argparse reads a word that starts with '-' (and is not a plain negative number) as a
    flag: it said "expected one argument" of a flag given one."""
    out = ["--out", str(tmp_path / "run")] if argv[0] == "train" else []
    refused = run_main(*argv, *out, capsys=capsys)
    assert refused.returncode == 2
    assert message in refused.stderr.splitlines()[-1]


def test_no_parser_takes_a_flag_by_its_prefix():
    parsers = [get_args_parser(), *_subparsers().values()]
    assert [parser.prog for parser in parsers if parser.allow_abbrev] == []


def test_manual_roles_take_their_own_counts():
    ps = config_from_args(parse_args(["ps", "--shard-id", "0", "--num-shards", "3"]))
    assert (ps.cluster.num_shards, ps.cluster.num_workers) == (3, 1)
    worker_argv = [
        "worker",
        "--ps",
        "tcp://127.0.0.9:1,tcp://127.0.0.9:2",
        "--rank",
        "0",
        "--num-workers",
        "5",
    ]
    worker = config_from_args(parse_args(worker_argv))
    assert (worker.cluster.num_shards, worker.cluster.num_workers) == (2, 5)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["ps", "--help"]])
def test_help_imports_no_torch(argv):
    code = (
        "import sys\n"
        "from distbelief.launch import cli\n"
        "try:\n"
        f"    cli.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'numpy', 'matplotlib', 'rich', 'tensorboard')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"')) == []


_REFUSED_BEFORE_ANY_PROCESS = """
import os, sys
from distbelief.launch import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("exit", code)
me = str(os.getpid())
def parent(pid):
    try:  # a process may end between the listing and the read
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return None
children = [pid for pid in os.listdir("/proc") if pid.isdigit() and parent(pid) == me]
print("children", len(children), "torch", "torch" in sys.modules)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--steps", "10", "--warmstart-steps", "20"],
            "argument --warmstart-steps: must be <= the 10 pushes",
        ),
        (
            # 1437 digits in two shares of 718: no worker could make a step.
            ["--steps", "5", "--batch-size", "719"],
            "argument --batch-size: must be <= the 718 training examples of each of the 2 workers",
        ),
        (
            # More workers than examples: no batch size would do, so --workers is named.
            ["--steps", "5", "--workers", "5000"],
            "argument --workers: must be <= the 1437 training examples (each worker trains on",
        ),
    ],
    ids=["warmstart-past-the-steps", "batch-past-a-share", "workers-past-the-examples"],
)
def test_a_plan_no_worker_can_follow_is_refused_before_any_process_starts(flags, message, tmp_path):
    argv = ["train", *flags, "--out", str(tmp_path / "run")]
    command = [sys.executable, "-c", _REFUSED_BEFORE_ANY_PROCESS, *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["exit 2", "children 0 torch False"], result.stderr
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def _refused(argv: list[str], tmp_path, env_extra: dict | None = None) -> tuple[list[str], str]:
    """Run the command in a fresh interpreter: (stdout lines, stderr)."""
    env = {**os.environ, **(env_extra or {})}
    command = [sys.executable, "-c", _REFUSED_BEFORE_ANY_PROCESS, *argv]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    return result.stdout.splitlines(), result.stderr


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--dataset", "cifar10", "--model", "alexnet", "--no-download", "--steps", "2"],
            "argument --data-dir: empty/cifar-10-batches-py lacks data_batch_1",
        ),
        (
            ["--dataset", "mnist", "--no-download", "--epochs", "1"],
            "argument --data-dir: empty/mnist lacks train-images-idx3-ubyte",
        ),
        (
            ["--dataset", "criteo", "--model", "dlrm", "--steps", "2"],
            "argument --data-dir: empty/criteo holds no Criteo training file",
        ),
        (
            ["--dataset", "movielens", "--model", "dlrm", "--steps", "2"],
            "argument --data-dir: empty/movielens holds no MovieLens ratings file",
        ),
    ],
    ids=["cifar10", "mnist-epochs", "criteo", "movielens"],
)
def test_missing_data_files_are_refused_before_any_process_starts(argv, message, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = ["train", *argv, "--data-dir", "empty", "--out", "run"]
    stdout, stderr = _refused(argv, tmp_path)
    assert stdout == ["exit 2", "children 0 torch False"], stderr
    assert message in _one_error_line(stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--dataset", "cifar10", "--no-download"],
        ["--dataset", "cifar10"],
        ["--dataset", "mnist", "--no-download"],
        ["--dataset", "criteo", "--model", "dlrm"],
        ["--dataset", "movielens", "--model", "dlrm"],
    ],
    ids=["cifar10-no-download", "cifar10", "mnist", "criteo", "movielens"],
)
def test_a_data_dir_that_is_a_file_is_called_a_file(argv, tmp_path, capsys):
    """It was told to extract the archive into the file, or that the file lacked a folder."""
    path = tmp_path / "data.tar.gz"
    path.write_bytes(b"not a folder")
    out = tmp_path / "run"
    assert main(["train", *argv, "--steps", "2", "--data-dir", str(path), "--out", str(out)]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert error.endswith(f"argument --data-dir: {path} is a file, not a folder"), error
    assert not out.exists()


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
@pytest.mark.parametrize(
    ("command", "split", "other"),
    [
        (["eval", "--once"], "test", "train"),
        (["worker", "--rank", "0", "--num-workers", "1"], "train", "test"),
    ],
    ids=["eval", "worker"],
)
def test_a_role_needs_the_files_of_its_split_alone(
    monkeypatch, tmp_path, capsys, dataset, command, split, other
):
    # An evaluator reads the test split alone (normalised by the published train-split
    # statistics), a worker the training split: each was refused for lacking the other's files.
    from distbelief.data import files

    if dataset == "cifar10":
        folder, split_files = tmp_path / files.CIFAR10_BATCHES_DIR, files.CIFAR10_SPLIT_FILES
    else:
        folder, split_files = tmp_path / files.MNIST_SUBDIR, files.MNIST_SPLIT_FILES
    folder.mkdir()
    for name in split_files[split]:
        (folder / name).write_bytes(b"")

    class _Stop(Exception):
        pass

    def stop(*_modules: str):
        raise _Stop  # past the checks: the evaluation is not this test's

    monkeypatch.setattr(cli, "import_with_signals_deferred", stop)
    argv = [command[0], "--ps", "tcp://127.0.0.1:1", *command[1:], "--dataset", dataset]
    argv += ["--data-dir", str(tmp_path), "--no-download"]
    with pytest.raises(_Stop):
        main(argv)
    for name in split_files[split]:  # the other split's files alone: its own are named
        (folder / name).unlink()
    for name in split_files[other]:
        (folder / name).write_bytes(b"")
    assert main(argv) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert f"argument --data-dir: {folder} lacks {', '.join(split_files[split])}" in error


_UNDER_A_FILE = "--out afile/run: cannot be created: afile exists and is not a folder"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["train", "--steps", "2", "--out", "afile/run"], {}, _UNDER_A_FILE),
        (
            ["eval", "--ps", "tcp://127.0.0.1:1", "--out", "afile/run"],
            {},
            "--out afile/run: cannot be created: afile exists and is not a folder",
        ),
        (["plot", "somerun", "--out", "afile"], {}, "--out afile: exists and is not a folder"),
        (
            [*_PS, "--checkpoint-dir", "afile"],
            {},
            "--checkpoint-dir afile: exists and is not a folder",
        ),
        (
            [*_PS, "--checkpoint-dir", "./sandblaster/checkpoints/"],
            {},
            "--checkpoint-dir ./sandblaster/checkpoints/: holds a Sandblaster run's checkpoints, "
            "a folder per committed iteration (lbfgs-N), not a shard's: serve a copy of one",
        ),
        (
            [*_PS, "--checkpoint-dir", "sandblaster/checkpoints/lbfgs-000003"],
            {},
            "--checkpoint-dir sandblaster/checkpoints/lbfgs-000003: is a committed iteration of "
            "a Sandblaster run, which --resume restores: serve a copy of it",
        ),
        (
            [*_PS, "--checkpoint-dir", "sandblaster"],
            {},
            "--checkpoint-dir sandblaster: is a run folder, not a shard's checkpoint folder: its "
            "shards keep theirs in sandblaster/checkpoints",
        ),
        (
            ["ps", "--shard-id", "0", "--num-shards", "1", "--bind", "tcp://198.51.100.7:7000"],
            {},
            "argument --bind: 198.51.100.7 is not an address of this machine",
        ),
        (
            # A label too long for the lookup's encoding: its error named no value.
            ["ps", "--shard-id", "0", "--num-shards", "1", "--bind", f"tcp://{'a' * 300}:7000"],
            {},
            f"argument --bind: host '{'a' * 300}' is not a valid host name",
        ),
        (
            ["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"],
            {"DISTBELIEF_TRANSPORT": "bogus"},
            "DISTBELIEF_TRANSPORT 'bogus': must be one of auto, tcp, shm",
        ),
        (
            [
                *["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"],
                *["--dataset", "mnist", "--no-download", "--data-dir", "."],
            ],
            {},
            "argument --data-dir: mnist lacks train-images-idx3-ubyte",
        ),
        (
            [
                *["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"],
                *["--partitions", "2", "--stage", "1", "--bind", "tcp://198.51.100.7:7000"],
            ],
            {},
            "argument --bind: 198.51.100.7 is not an address of this machine",
        ),
        (
            ["ps", "--shard-id", "0", "--num-shards", "1", "--liveness-timeout", "3"],
            {},
            "argument --liveness-timeout: only used with --sync or --max-staleness",
        ),
        (
            ["train", "--steps", "2", "--out", "run"],
            {"DISTBELIEF_TRANSPORT": "bogus"},
            "DISTBELIEF_TRANSPORT 'bogus': must be one of auto, tcp, shm",
        ),
        (
            ["train", "--resume", "somerun"],
            {"DISTBELIEF_TRANSPORT": "bogus"},
            "DISTBELIEF_TRANSPORT 'bogus': must be one of auto, tcp, shm",
        ),
    ],
    ids=[
        *("train-out", "eval-out", "plot-out", "ps-checkpoint-dir", "ps-sandblaster-folder"),
        *("ps-sandblaster-iteration", "ps-run-folder"),
        *("ps-bind", "ps-bind-label-too-long", "env", "worker"),
        *("stage-bind", "ps-liveness", "train-env", "resume-env"),
    ],
)
def test_bad_paths_addresses_and_settings_are_one_line(argv, env, message, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "somerun").mkdir()
    (tmp_path / "sandblaster" / "checkpoints" / "lbfgs-000003").mkdir(parents=True)
    (tmp_path / "sandblaster" / "checkpoints" / "coordinator.json").write_text("{}")
    (tmp_path / "sandblaster" / "config.json").write_text("{}")
    # Beside a Sandblaster run's folders, a folder of another name is no run's.
    (tmp_path / "lbfgs-mnist").mkdir()
    stdout, stderr = _refused(argv, tmp_path, env)
    # Refused at once: before any process starts and before torch is loaded.
    assert stdout == ["exit 2", "children 0 torch False"], stderr
    assert message in _one_error_line(stderr)
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "argv",
    [
        ["ps", "--shard-id", "0", "--num-shards", "1", "--no-auth"],
        [
            *["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"],
            *["--partitions", "2", "--stage", "1"],
        ],
    ],
    ids=["ps", "stage"],
)
def test_a_bind_address_in_use_is_refused_before_any_process_starts(argv, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        stdout, stderr = _refused([*argv, "--bind", address], tmp_path)
    assert stdout == ["exit 2", "children 0 torch False"], stderr
    assert _one_error_line(stderr).endswith(
        f"error: argument --bind: cannot bind {address}: address already in use"
    )


_TAKEN = "cannot bind tcp://127.0.0.1:7000: address already in use"


@pytest.mark.parametrize(
    ("argv", "code", "said"),
    [
        (["ps", "--shard-id", "0", "--num-shards", "1"], 2, f"error: argument --bind: {_TAKEN}"),
        (
            [
                *["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"],
                *["--partitions", "2", "--stage", "1", "--bind", "tcp://127.0.0.1:7000"],
            ],
            2,
            f"error: argument --bind: {_TAKEN}",
        ),
        (["train"], 1, f"BindError: {_TAKEN}"),  # a port of the launcher's own: no flag
    ],
    ids=["ps", "stage", "train"],
)
def test_a_port_taken_after_the_check_is_named_as_bind(argv, code, said, monkeypatch, capsys):
    def bound_too_late(_args):
        raise BindError("tcp://127.0.0.1:7000", "address already in use")

    monkeypatch.setitem(cli._COMMANDS, argv[0], bound_too_late)
    assert main(argv) == code
    assert capsys.readouterr().err.splitlines()[-1] == f"distbelief {argv[0]}: {said}"


def test_a_bad_flag_is_reported_under_a_one_line_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--model", "resnet"])
    assert exited.value.code == 2
    usage, error = capsys.readouterr().err.splitlines()
    assert usage == "usage: distbelief train [options] (all of them: distbelief train --help)"
    assert error.startswith("distbelief train: error: argument --model: invalid choice: 'resnet'")
    assert parse_args(["train", "-v"]).verbose and parse_args(["-v", "train"]).verbose
    assert not parse_args(["train"]).verbose


def test_a_shard_that_lost_its_parameters_fails_the_command_not_its_flags(monkeypatch, capsys):
    """ShardEmptyError is a ValueError too, which the command line took for bad input (exit 2,
    ``error:``): a shard restarted without its checkpoints is a failure of the job, exit 1."""
    from distbelief.errors import ShardEmptyError

    def lost(_args):
        raise ShardEmptyError("shard 1 (tcp://127.0.0.1:7001) holds no parameters")

    monkeypatch.setitem(cli._COMMANDS, "plot", lost)
    assert main(["plot", "somerun"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "distbelief plot: ShardEmptyError: shard 1 (tcp://127.0.0.1:7001) holds no parameters"
    )


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (KeyboardInterrupt(), "distbelief plot: interrupted"),
        (
            Terminated("stopped by signal SIGTERM"),
            "distbelief plot: stopped by signal SIGTERM",
        ),
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupted_command_says_how(raised, said, monkeypatch, capsys):
    def interrupted(_args):
        raise raised

    monkeypatch.setitem(cli._COMMANDS, "plot", interrupted)
    assert main(["plot", "somerun"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == said


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["worker", "--ps", "nohost.invalid:1", "--rank", "0", "--num-workers", "1"],
            "argument --ps: 'nohost.invalid:1': host 'nohost.invalid' is not known here",
        ),
        (
            [
                "worker",
                "--ps",
                "127.0.0.9:1,shm://nohost.invalid:2",
                "--rank",
                "0",
                "--num-workers",
                "1",
            ],
            "argument --ps: 'shm://nohost.invalid:2': host 'nohost.invalid' is not known here",
        ),
        (
            ["eval", "--ps", "nohost.invalid:1"],
            "argument --ps: 'nohost.invalid:1': host 'nohost.invalid' is not known here",
        ),
    ],
    ids=["worker", "worker-shm", "eval"],
)
def test_a_host_no_lookup_knows_is_refused_at_once(argv, message, capsys):
    # Not retried until --retry-timeout: a typo in a host name is bad input.
    assert main(argv) == 2
    assert message in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("tcp://[::1:1", "address 'tcp://[::1:1' is not of the form tcp://HOST:PORT"),
        ("tcp://::1]:1", "address 'tcp://::1]:1' is not of the form tcp://HOST:PORT"),
        ("tcp://127.0.0.9:0", "address 'tcp://127.0.0.9:0': port 0 cannot be connected to"),
        ("shm://127.0.0.9:0", "address 'shm://127.0.0.9:0': port 0 cannot be connected to"),
        # Digits of another script: int() reads them, and the error named the address as typed.
        (
            "tcp://127.0.0.9:\u0667\u0660",
            "address 'tcp://127.0.0.9:\u0667\u0660' is not of the form",
        ),
    ],
    ids=["open-bracket", "close-bracket", "port-0", "shm-port-0", "arabic-indic-digits"],
)
def test_a_shard_address_no_connection_can_reach_is_refused_at_once(address, message, capsys):
    # Not retried until --retry-timeout: the address is bad input.
    assert main(["worker", "--ps", address, "--rank", "0", "--num-workers", "1"]) == 2
    assert f"argument --ps: {message}" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["keygen", ""], "path"),
        (["ps", "--shard-id", "0", "--num-shards", "1", "--auth-key-file", ""], "--auth-key-file"),
        ([*_PS, "--tls-cert", "", "--tls-key", "key.pem"], "--tls-cert"),
        ([*_PS, "--tls-cert", "cert.pem", "--tls-key", " "], "--tls-key"),
        (["worker", "--ps", "tcp://127.0.0.9:1", "--rank", "0", "--tls-ca", ""], "--tls-ca"),
        # An empty --resume ran a fresh job; an empty RUN_DIR was read as the working folder.
        (["train", "--resume", ""], "--resume"),
        (["reshard", "", "--shards", "2"], "RUN_DIR"),
        (["plot", ""], "RUN_DIR"),
        (["plot", "--out", " ", "runs/a"], "--out"),
        # It served with no checkpoints at all, as if the flag had not been given.
        ([*_PS, "--checkpoint-dir", ""], "--checkpoint-dir"),
    ],
    ids=[
        "keygen",
        "auth-key-file",
        "tls-cert",
        "tls-key",
        "tls-ca",
        "resume",
        "reshard",
        "plot",
        "plot-out",
        "checkpoint-dir",
    ],
)
def test_an_empty_file_name_is_refused_naming_its_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected a value, got " in _one_error_line(capsys.readouterr().err)


def test_a_shard_refused_for_its_key_file_makes_no_checkpoint_folder(capsys, tmp_path):
    missing, folder = tmp_path / "no.key", tmp_path / "checkpoints"
    argv = [*_PS[:-1], "--auth-key-file", str(missing), "--checkpoint-dir", str(folder)]
    assert main(argv) == 2
    assert f"--auth-key-file: key file {missing}: No such file" in capsys.readouterr().err
    assert not folder.exists()


def test_a_data_set_that_cannot_be_fetched_is_bad_input(capsys, tmp_path, monkeypatch):
    from distbelief.data import cifar10

    monkeypatch.setattr(cifar10, "CIFAR10_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    data_dir, run = tmp_path / "data" / "cifar", tmp_path / "run"
    argv = ["train", "--dataset", "cifar10", "--model", "alexnet", "--steps", "5"]
    assert main([*argv, "--data-dir", str(data_dir), "--out", str(run)]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert "argument --data-dir: CIFAR-10 train split unavailable" in error
    assert not run.exists() and not (tmp_path / "data").exists()


def test_eval_once_refuses_an_out_folder_it_would_leave_empty(capsys, tmp_path):
    out = tmp_path / "evals"
    assert main(["eval", "--ps", "tcp://127.0.0.9:1", "--once", "--out", str(out)]) == 2
    assert "argument --out: not used with --once (it prints)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("on", "off", "field"),
    [("--eval", "--no-eval", "eval_during_training"), ("--plots", "--no-plots", "draw_plots")],
)
def test_a_switch_turned_off_is_turned_back_on_and_refused_beside_its_off(capsys, on, off, field):
    path = f"reporting.{field}"
    assert vars(parse_args(["train", on]))[path] is True
    assert vars(parse_args(["train", off]))[path] is False
    assert path not in vars(parse_args(["train"]))
    with pytest.raises(SystemExit) as refused:
        parse_args(["train", on, off])
    assert refused.value.code == 2
    assert f"argument {off}: not allowed with argument {on}" in capsys.readouterr().err


def test_eval_once_refuses_an_interval_it_would_ignore(capsys):
    assert main(["eval", "--ps", "tcp://127.0.0.9:1", "--once", "--eval-every", "5"]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert "argument --eval-every: not used with --once (it evaluates once)" in error


def test_the_transport_the_environment_sets_is_the_configs(monkeypatch):
    # config.json records the transport the job used: DISTBELIEF_TRANSPORT's when no flag says.
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    assert config_from_args(parse_args(["train"])).cluster.transport == "tcp"
    assert config_from_args(parse_args(["train", "--transport", "shm"])).cluster.transport == "shm"


def test_an_empty_setting_in_the_environment_is_unset(monkeypatch):
    """As a shell's ``NAME= command`` clears it: each DISTBELIEF_* variable was refused."""
    from distbelief.launch.cli_checks import check_environment
    from distbelief.launch.ray_placement import PLACEMENT_TIMEOUT_S, placement_timeout_s
    from distbelief.optim.connection_settings import DEFAULT_TIMEOUT_S, request_timeout_s
    from distbelief.wire.channels.shm import apply_job_transport, transport_setting

    for name in ("TRANSPORT", "TIMEOUT_S", "PLACEMENT_TIMEOUT_S", "PS", "AUTH_KEY_FILE"):
        monkeypatch.setenv(f"DISTBELIEF_{name}", "")
    check_environment()
    assert transport_setting() == "auto"
    assert config_from_args(parse_args(["train"])).cluster.transport == "auto"
    apply_job_transport("auto")
    assert os.environ["DISTBELIEF_TRANSPORT"] == "auto"
    assert request_timeout_s(None) == DEFAULT_TIMEOUT_S
    assert placement_timeout_s() == PLACEMENT_TIMEOUT_S


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["ps", "--shard-id", "0", "--num-shards", "1", "--no-auth", "--bind"], "--bind"),
        (["worker", "--rank", "0", "--num-workers", "1", "--ps"], "--ps"),
        (["eval", "--once", "--ps"], "--ps"),
    ],
)
@pytest.mark.parametrize("from_environment", [False, True])
def test_an_shm_address_under_the_tcp_transport_is_refused(
    argv, flag, from_environment, capsys, monkeypatch
):
    # The address asks for shared memory, the transport rules it out: neither may lose unsaid.
    address = "shm://127.0.0.1:0" if flag == "--bind" else "shm://127.0.0.1:7000"
    if from_environment:
        monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
        transport = []
    else:
        monkeypatch.delenv("DISTBELIEF_TRANSPORT", raising=False)
        transport = ["--transport", "tcp"]
    assert main([*argv, address, *transport]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert f"argument {flag}: {address} asks for shared memory" in error
    assert "--transport tcp" in error


def test_resuming_a_folder_that_is_not_there_says_so(capsys, tmp_path):
    missing = tmp_path / "nope"
    assert main(["train", "--resume", str(missing)]) == 2
    assert f"argument --resume: {missing}: no such run folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["train", "--resume", "{file}"], "argument --resume: {file}: a file, not a run folder"),
        (
            ["train", "--resume", "{missing}", "--workers", "3"],
            "argument --resume: {missing}: no such run folder",
        ),
        (["reshard", "{file}", "--shards", "2"], "{file}: a file, not a run folder"),
    ],
)
def test_a_run_folder_that_is_a_file_or_missing_is_named_first(argv, said, capsys, tmp_path):
    """Not 'no such run folder' for a file the user can see, nor a complaint about another
    flag for a folder that is not there."""
    names = {"file": tmp_path / "run.txt", "missing": tmp_path / "nope"}
    names["file"].write_text("not a run\n")
    result = run_main(*(word.format(**names) for word in argv), capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(said.format(**names))
    assert sorted(tmp_path.iterdir()) == [names["file"]]


def _run_folder_of_no_checkpoint(run_dir: Path) -> Path:
    """A run folder as a run stopped before its shards saved anything leaves it: its
    config.json alone."""
    run_dir.mkdir()
    (run_dir / "config.json").write_text(
        JobConfig().with_fields({"reporting.out_dir": str(run_dir)}).to_json()
    )
    return run_dir


def test_resuming_a_run_stopped_before_its_first_checkpoint_says_how_to_start_it_again(
    capsys, tmp_path
):
    """A run stopped within its first seconds has its config.json and summary.json but no
    checkpoint to go on from; the same folder takes a new run (named as the shell reads it)."""
    run_dir = _run_folder_of_no_checkpoint(tmp_path / "my run")
    result = run_main("train", "--resume", str(run_dir), capsys=capsys)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"--resume {run_dir}: no shard checkpoints in {run_dir / 'checkpoints'} (it stopped "
            f"before its shards saved any: start it again with --out '{run_dir}')"
        )
    )
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.json"]


def test_a_run_whose_checkpoints_are_gone_is_not_offered_for_a_new_run_over_its_records(
    capsys, tmp_path
):
    """Its metrics.csv holds its training's records: --resume said "start it again with --out
    RUN", and that new run wrote over them. Both now send it to another folder."""
    run_dir = _run_folder_of_no_checkpoint(tmp_path / "run")
    records = "time_s,role,rank,step,loss\n0.1,worker,0,1,2.3\n"
    (run_dir / "metrics.csv").write_text(records)
    resumed = run_main("train", "--resume", str(run_dir), capsys=capsys)
    assert resumed.returncode == 2
    assert (
        resumed.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"--resume {run_dir}: no shard checkpoints in {run_dir / 'checkpoints'}, though its "
            "metrics.csv holds records of its training: its checkpoints are gone, and nothing can "
            "go on from them; start a new run in another folder (one in this folder would write "
            "over these records)"
        )
    )
    started = run_main("train", "--steps", "1", "--out", str(run_dir), capsys=capsys)
    assert started.returncode == 2
    assert (
        started.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"--out {run_dir} holds the records of a run whose checkpoints are gone (its "
            "metrics.csv), which a new run would write over: give another folder"
        )
    )
    assert (run_dir / "metrics.csv").read_text() == records
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.json", "metrics.csv"]


def test_a_run_stopped_before_it_trained_is_offered_for_a_new_run_though_it_has_rows(
    capsys, tmp_path
):
    """The launcher's first poll of the shards, and an evaluation of version 0, write rows
    before any checkpoint: they are no training that a new run would write over."""
    run_dir = _run_folder_of_no_checkpoint(tmp_path / "run")
    (run_dir / "metrics.csv").write_text(
        "time_s,role,rank,step,loss\n0.0,shard,0,0,\n0.1,evaluator,0,0,2.3\n"
    )
    resumed = run_main("train", "--resume", str(run_dir), capsys=capsys)
    assert resumed.returncode == 2
    assert "(it stopped before its shards saved any: start it again with --out" in resumed.stderr


@pytest.mark.skipif(
    not os.path.isdir("/proc/sys") or os.access("/proc/sys", os.W_OK),
    reason="needs a folder this user cannot write in",
)
@pytest.mark.parametrize(
    ("out", "said"),
    [
        ("/proc/sys", "--out /proc/sys: the folder is not writable"),
        (
            "/proc/sys/run",
            "--out /proc/sys/run: cannot create the folder: /proc/sys is not writable",
        ),
    ],
)
def test_an_out_folder_that_cannot_be_written_is_named_as_it_is(out, said, capsys):
    """A folder that is there is not one 'cannot create': it is one nothing can be written in."""
    result = run_main("train", "--steps", "2", "--out", out, capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"distbelief train: error: {said}"


def test_the_ray_address_help_offers_no_value_the_flag_refuses(capsys):
    # An empty --ray-address is refused ("expected a value"): the help says what leaving the
    # flag out does instead.
    ray_address = field_docs()["cluster.ray_address"]
    assert "empty" not in ray_address
    assert "not given, or local: a Ray instance started on this machine for the job" in (
        ray_address
    )
    with pytest.raises(SystemExit):
        parse_args(["train", "--cluster", "ray", "--ray-address", ""])
    assert "argument --ray-address: expected a value, got ''" in capsys.readouterr().err


def test_ray_address_local_asks_for_an_instance_of_the_jobs_own_as_leaving_it_out_does():
    argv = ["train", "--cluster", "ray", "--ray-address", "local"]
    assert config_from_args(parse_args(argv)).cluster.ray_address == ""
    # A run that joined a cluster resumes on a Ray instance of its own.
    joined = JobConfig.from_fields({"cluster.engine": "ray", "cluster.ray_address": "auto"})
    assert joined.with_fields({"cluster.ray_address": "local"}).cluster.ray_address == ""
    assert main(["train", "--ray-address", "local"]) == 2  # still only with --cluster ray


_TOO_LONG = "x" * 300
"""A file name longer than any file system takes (255 bytes): a path check meets ENAMETOOLONG."""
TLS_CA = ("--tls-ca", "{long}")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "--steps", "5", "--out", "{long}"], "--out {long}: File name too long"),
        (
            ["train", "--resume", "{long}"],
            "--resume: {long}: not a run folder (File name too long)",
        ),
        (["reshard", "{long}", "--shards", "2"], "{long}: not a run folder (File name too long)"),
        (["plot", "{tmp}", "--out", "{long}"], "--out {long}: File name too long"),
        (
            ["eval", "--ps", "tcp://127.0.0.9:1", "--out", "{long}"],
            "--out {long}: File name too long",
        ),
        ([*_PS, "--checkpoint-dir", "{long}"], "--checkpoint-dir {long}: File name too long"),
        (
            ["worker", "--ps", "tcp://127.0.0.9:1", "--rank", "0", "--num-workers", "1", *TLS_CA],
            "--tls-ca {long}: File name too long",
        ),
    ],
)
def test_a_path_too_long_for_the_file_system_is_named_with_its_flag(argv, named, tmp_path, capsys):
    long = str(tmp_path / _TOO_LONG)
    argv = [arg.format(long=long, tmp=tmp_path) for arg in argv]
    result = run_main(*argv, capsys=capsys)
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "error" in line]
    assert line.endswith(named.format(long=long)), line
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("made", "said"), [("nothing", "is missing"), ("a file", "is not a folder")]
)
def test_a_host_without_a_shared_memory_folder_is_refused_before_anything_starts(
    capsys, tmp_path, monkeypatch, made, said
):
    """multiprocessing keeps the launcher's stop flags in /dev/shm: without one (a container),
    the job failed as it started with a bare `FileNotFoundError: ... '/dev/shm'`."""
    from distbelief.launch import local

    folder = tmp_path / "shm"
    if made == "a file":
        folder.write_text("")
    monkeypatch.setattr(local, "SHARED_MEMORY_FOLDER", str(folder))
    out = tmp_path / "run"
    result = run_main("train", "--steps", "5", "--out", str(out), capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"distbelief train: error: this host's {folder} {said}: the local launcher's "
        "processes share their stop flags there; start the shards and workers by hand "
        "(distbelief ps, distbelief worker), which need none"
    )
    assert not out.exists()


def test_a_hang_up_stops_a_command_as_sigterm_does_unless_nohup_ignores_it():
    from distbelief.launch.console import raise_terminated, stop_on_hang_up

    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts it
        assert stop_on_hang_up() == signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert stop_on_hang_up() == signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is raise_terminated
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_shards_folder_beside_sandblaster_folders_is_served(tmp_path):
    """Only a committed iteration itself is refused: a folder beside one of another name (a
    copy made where the README says to make one), or beside a folder that merely starts
    like one, is a shard's."""
    from distbelief.launch.cli import _check_serves_a_shards_folder

    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "lbfgs-000005").mkdir(parents=True)
    (checkpoints / "coordinator.json").write_text("{}")
    (checkpoints / "mycopy").mkdir()
    (tmp_path / "lbfgs-mnist").mkdir()
    (tmp_path / "shard-ckpt").mkdir()
    for folder in (checkpoints / "mycopy", tmp_path / "shard-ckpt"):
        _check_serves_a_shards_folder(str(folder))
    with pytest.raises(ValueError, match="is a committed iteration of a Sandblaster run"):
        _check_serves_a_shards_folder(str(checkpoints / "lbfgs-000005"))


@pytest.mark.parametrize(
    ("flag", "value", "kind"),
    [
        ("--workers", "\u0663", "int"),  # Arabic-Indic 3: int() reads it
        ("--workers", "1_0", "int"),  # int() reads 10: ten workers ran
        ("--workers", " 3", "int"),
        ("--lr", "\u0660.5", "float"),
        ("--lr", "1_0.0", "float"),
        ("--lr", "0.1 ", "float"),
    ],
)
def test_a_number_is_taken_as_typed_in_ascii_digits_or_refused(capsys, flag, value, kind):
    result = run_main("train", flag, value, "--steps", "1", capsys=capsys)
    assert result.returncode == 2
    assert _one_error_line(result.stderr).endswith(
        f"argument {flag}: invalid {kind} value: {value!r}"
    )


def test_numbers_in_lists_are_taken_as_typed_too(capsys):
    args = parse_args(["train", "--split-points", "+3,7", "--server-betas", ".9,9e-1"])
    assert (vars(args)["pipeline.split_points"], vars(args)["server.betas"]) == ((3, 7), (0.9, 0.9))
    for flag, value in (("--split-points", "\u0663,7"), ("--server-betas", "0.9,\u0660.9")):
        result = run_main("train", flag, value, capsys=capsys)
        assert result.returncode == 2
        assert repr(value) in _one_error_line(result.stderr)


def test_a_local_run_placed_on_hosts_resumes_on_ray_without_them(tmp_path):
    # Its --shard-hosts and --worker-host were refused as the ray engine's, and could not be
    # cleared: a resume keeps a run's values, and the flags are refused with --cluster ray.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    placed = {"cluster.shard_hosts": ("127.0.0.2",), "cluster.worker_host": "127.0.0.3"}
    config = JobConfig.from_fields(placed)
    (run_dir / "config.json").write_text(config.to_json())
    args = parse_args(["train", "--resume", str(run_dir), "--cluster", "ray"])
    resumed = config.with_fields(cli._resume_changes(args))
    assert resumed.cluster.engine == "ray"
    assert (resumed.cluster.shard_hosts, resumed.cluster.worker_host) == (
        JobConfig().cluster.shard_hosts,
        JobConfig().cluster.worker_host,
    )


def test_row_caches_larger_than_the_machines_memory_are_refused(capsys, tmp_path, monkeypatch):
    # Each worker allocated its cache whole as it started: it failed then, or stalled past
    # the shards' timeout, which failed the job with a line naming the evaluator.
    monkeypatch.setattr("distbelief.config.physical_memory_bytes", lambda: 1000 * 2**20)
    argv = ["--model", "dlrm", "--dataset", "synthetic-ctr", "--workers", "2"]
    assert main(["train", *argv, "--row-cache-mb", "600", "--out", str(tmp_path / "run")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.endswith(
        "argument --row-cache-mb: must fit 2 times in this machine's memory (1000 MiB): each "
        "worker allocates its cache whole as it starts, got 600"
    ), line
    assert not (tmp_path / "run").exists()
    # Under Ray the workers run where Ray places them: a job that joins a cluster is not
    # held to this machine's memory (refused here for the address nothing answers at).
    ray = ["--cluster", "ray", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "ray")]
    assert main(["train", *argv, "--row-cache-mb", "600", *ray]) == 2
    assert "--row-cache-mb" not in capsys.readouterr().err
