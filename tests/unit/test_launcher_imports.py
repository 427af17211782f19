"""The commands' heavy imports (the launcher's before a job; torch for ps, worker and eval): a
signal that arrives while they run is acted on only once they are all loaded (a handler's
exception inside a C extension's initialisation can crash the interpreter, or be lost), and the
handlers in place before are put back."""

from __future__ import annotations

import logging
import signal
import sys
import textwrap

import pytest

from distbelief.launch import cli
from distbelief.launch.deferred_signals import import_with_signals_deferred


def _module_that_signals(tmp_path, name: str, signum: int) -> str:
    """A module that sends ``signum`` to this process while it is being imported, then goes
    on with its own initialisation."""
    source = f"""
        import os
        os.kill(os.getpid(), {int(signum)})
        for _ in range(100_000):  # bytecode boundaries: where a handler's exception lands
            pass
        LOADED = True
    """
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return name


@pytest.fixture
def importable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("signals_during_import_")]:
        del sys.modules[name]


def test_ctrl_c_during_the_imports_is_raised_after_all_are_loaded(importable) -> None:
    first = _module_that_signals(importable, "signals_during_import_a", signal.SIGINT)
    (importable / "signals_during_import_b.py").write_text("LOADED = True\n")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        import_with_signals_deferred(first, "signals_during_import_b")
    assert sys.modules[first].LOADED and sys.modules["signals_during_import_b"].LOADED
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_during_the_imports_reaches_the_handler_in_place_afterwards(importable) -> None:
    module = _module_that_signals(importable, "signals_during_import_c", signal.SIGTERM)
    seen: list[bool] = []

    def handler(signum: int, _frame: object) -> None:
        seen.append(bool(getattr(sys.modules.get(module), "LOADED", False)))

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        import_with_signals_deferred(module)
        assert seen == [True]  # once, after the module had finished loading
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_without_a_signal_nothing_is_raised(importable) -> None:
    (importable / "signals_during_import_d.py").write_text("LOADED = True\n")
    loaded = import_with_signals_deferred("signals_during_import_d")
    assert loaded is sys.modules["signals_during_import_d"] and loaded.LOADED


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        # Port 0: the default 7000 may be another program's on a shared machine.
        (
            [
                "ps",
                "--shard-id",
                "0",
                "--num-shards",
                "1",
                "--no-auth",
                "--bind",
                "tcp://127.0.0.1:0",
            ],
            "server.process",
        ),
        (["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"], "worker"),
        (["eval", "--ps", "tcp://127.0.0.1:1", "--once"], "evaluator"),
        (["reshard", "run", "--shards", "2"], "launch.reshard"),
    ],
)
def test_each_command_imports_torch_with_signals_deferred(monkeypatch, argv, module):
    imported: list[tuple[str, ...]] = []

    class _Stop(Exception):
        pass

    def deferred(*modules: str):
        imported.append(modules)
        raise _Stop  # the command's work is not this test's

    monkeypatch.setattr(cli, "import_with_signals_deferred", deferred)
    with pytest.raises(_Stop):
        cli.main(argv)
    assert imported == [(f"distbelief.{module}",)]


@pytest.mark.parametrize(
    ("fields", "resume"),
    [
        ({"optimizer.epochs": 1, "optimizer.steps": None}, False),  # counts the training set
        ({"model.name": "mlp", "pipeline.num_partitions": 2}, False),  # plans the partitions
        ({"model.name": "dlrm", "data.name": "criteo"}, False),  # checks the data files
        ({}, True),  # checks the checkpoints against the model
    ],
    ids=["epochs", "partitions", "data-files", "resume"],
)
def test_train_imports_torch_for_its_checks_with_signals_deferred(
    monkeypatch, tmp_path, fields, resume
):
    """A Ctrl-C inside torch's import, which these checks made in the launcher itself, was
    lost there: the job then ran to its end."""
    from distbelief.config import JobConfig
    from distbelief.launch import job
    from distbelief.launch.local import LocalCluster

    imported: list[tuple[str, ...]] = []

    class _Stop(Exception):
        pass

    def deferred(*modules: str):
        imported.append(modules)
        raise _Stop  # the job is not this test's

    monkeypatch.setattr(job, "import_with_signals_deferred", deferred)
    monkeypatch.setattr(LocalCluster, "warm_up", classmethod(lambda cls, config: None))
    config = JobConfig().with_fields(
        {"optimizer.steps": 5, "reporting.out_dir": str(tmp_path / "run"), **fields}
    )
    if config.data.name == "criteo":
        lines = ["\t".join(["1"] + ["0"] * 13 + ["0" * 8] * 26) + "\n"] * 20
        (tmp_path / "criteo").mkdir()
        (tmp_path / "criteo" / "train.txt").write_text("".join(lines))
        config = config.with_fields({"data.data_dir": str(tmp_path), "optimizer.batch_size": 1})
    if resume:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text(config.to_json())
    with pytest.raises(_Stop):
        job.train(config, resume=resume)
    assert imported and "torch" in imported[0]


_INTERRUPTED_WHILE_LOADING = """
import builtins, os, signal, sys

real_import = builtins.__import__

def importing(name, *args, **kwargs):
    if name == "distbelief.launch.cli":  # Ctrl-C (or SIGTERM) as the command line loads
        os.kill(os.getpid(), signal.{signal})
        for _ in range(100_000):  # bytecode boundaries: where the KeyboardInterrupt lands
            pass
    return real_import(name, *args, **kwargs)

builtins.__import__ = importing
sys.argv = ["distbelief", "train", "--steps", "5"]
{run}
"""


@pytest.mark.parametrize(
    "run",
    [
        "from distbelief.launch.console import main\nsys.exit(main())",  # the console script
        "import runpy\nrunpy.run_module('distbelief', run_name='__main__')",  # python -m
    ],
    ids=["distbelief", "python-m"],
)
@pytest.mark.parametrize(
    ("signal_name", "said"),
    [("SIGINT", "interrupted"), ("SIGTERM", "stopped by signal SIGTERM")],
)
def test_ctrl_c_while_the_command_loads_is_one_line_not_a_traceback(run, signal_name, said):
    """The command's own handling of Ctrl-C and SIGTERM (one line, exit 130) is in place only
    once its modules are loaded: a Ctrl-C before it printed a KeyboardInterrupt traceback, and
    a SIGTERM ended the command silently with exit 143."""
    import subprocess

    from tests.conftest import CHILD_ENV

    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_WHILE_LOADING.format(run=run, signal=signal_name)],
        capture_output=True,
        text=True,
        timeout=120,
        env=CHILD_ENV,
    )
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr == f"distbelief: {said}\n"


_SIGNALLED_AS_IT_EXITS = """
import os, signal, sys, time
sys.argv = ["distbelief", "plot", sys.argv[1]]
from distbelief.launch.console import main
code = main()
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # as the interpreter exits
    os.kill(os.getpid(), signum)
time.sleep(0.5)
sys.exit(code)
"""


def test_a_signal_once_the_command_has_its_exit_code_changes_nothing(tmp_path):
    """A second Ctrl-C as the command exits (unloading torch, where Python has given SIGINT
    its default action back) ended it by the signal: a parent saw a death by SIGINT, not the
    exit code the command had printed its line for."""
    import subprocess

    from tests.conftest import CHILD_ENV

    result = subprocess.run(
        [sys.executable, "-c", _SIGNALLED_AS_IT_EXITS, str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
        env=CHILD_ENV,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_ctrl_c_as_a_new_job_starts_leaves_no_run_folder(monkeypatch, tmp_path):
    """Ctrl-C while the launcher loads what the job needs (after config.json is written, before
    any process starts) left a run folder holding config.json alone: nothing to plot or
    resume. It is removed, as a refused job's is; one whose processes wrote rows is kept."""
    from distbelief.config import JobConfig
    from distbelief.launch import job

    def interrupted(*modules: str) -> None:
        if modules[: len(job.LOADED_BEFORE_THE_JOB)] == job.LOADED_BEFORE_THE_JOB:
            raise KeyboardInterrupt  # as the deferred signal is raised once they are loaded

    monkeypatch.setattr(job, "import_with_signals_deferred", interrupted)
    run_dir = tmp_path / "run"
    config = JobConfig().with_fields({"optimizer.steps": 5, "reporting.out_dir": str(run_dir)})
    with pytest.raises(KeyboardInterrupt):
        job.train(config)
    assert not run_dir.exists()
    # A folder the user made before is theirs: it stays, with what the job wrote.
    run_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        job.train(config)
    assert [path.name for path in run_dir.iterdir()] == ["config.json"]


@pytest.mark.parametrize("draw_plots", [True, False], ids=["plots", "no-plots"])
def test_ctrl_c_before_the_first_process_starts_leaves_no_run_folder(
    monkeypatch, tmp_path, caplog, draw_plots
):
    """Ctrl-C once the cluster is open but before it started a process left a folder of an
    empty metrics.csv and an 'interrupted' summary.json: nothing to plot or resume. Nor does
    a line name the folder gone (--no-plots said to draw its plots later, --plots that its
    metrics.csv held no record)."""
    from distbelief.config import JobConfig
    from distbelief.errors import LauncherInterrupted
    from distbelief.launch import job

    def interrupted(*_args: object, **_kwargs: object) -> list[str]:
        raise KeyboardInterrupt  # as Ctrl-C lands before the first shard starts

    monkeypatch.setattr(job, "_start", interrupted)
    run_dir = tmp_path / "run"
    config = JobConfig().with_fields(
        {
            "optimizer.steps": 5,
            "reporting.out_dir": str(run_dir),
            "reporting.draw_plots": draw_plots,
        }
    )
    with caplog.at_level(logging.INFO), pytest.raises((KeyboardInterrupt, LauncherInterrupted)):
        job.train(config)
    assert not run_dir.exists()
    assert not [r.getMessage() for r in caplog.records if str(run_dir) in r.getMessage()]
