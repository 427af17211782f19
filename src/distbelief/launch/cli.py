"""The ``distbelief`` command: parsed flags -> config -> run. Nothing else lives here, and what
it imports to build the parser imports no torch: ``--help`` stays fast. The checks of flags
after parsing are ``cli_checks.py``'s, the failures' exit codes and lines ``cli_errors.py``'s,
what ``train`` says of a finished job ``train_report.py``'s.

Exit codes: 0 done, 1 a process failed, 2 bad flags or input, 130 interrupted. Errors are one
line; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from distbelief.config import TRANSPORT_ENV, JobConfig, environment_setting
from distbelief.deferred_signals import signals_deferred
from distbelief.errors import ChildFailedError, ConfigFieldError
from distbelief.launch.cli_checks import (
    check_bind_is_here,
    check_device,
    check_environment,
    check_no_shm_under_tcp,
    check_stage_flags,
    flag_addresses,
)
from distbelief.launch.cli_errors import child_failed, run_reporting_failures, save_traceback
from distbelief.launch.console import raise_terminated, stop_on_hang_up
from distbelief.launch.deferred_signals import import_with_signals_deferred
from distbelief.launch.flags import (
    check_typed_flags_apply,
    flag_of,
    get_args_parser,
    security_from_args,
)
from distbelief.launch.hints import shell_word
from distbelief.launch.run_lock import shard_checkpoints_locked
from distbelief.launch.rundir import release_reserved, reserve_run_dir
from distbelief.launch.train_report import restore_lines, versions_said

logger = logging.getLogger("distbelief")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    args.argv = argv  # a refusal found after parsing quotes a value as it was typed
    return args


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The JobConfig that the flags of ``train``, ``ps``, ``worker`` or ``eval`` describe.

    Raises:
        ConfigFieldError: a flag's value is out of range, or the flag does nothing with the
            others given (``field`` names its config field).
        argparse.ArgumentError: an address given with --ps is malformed.
    """
    values = {name: value for name, value in vars(args).items() if "." in name}
    # Config flags default to absent (but ps's --num-workers): these are the ones typed.
    typed = set(values)
    if args.command in ("worker", "eval"):
        values["cluster.num_shards"] = len(flag_addresses("--ps", args.ps))
    if "cluster.transport" not in typed and environment_setting(TRANSPORT_ENV):
        # The job's transport, as the run's config.json records it (checked: check_environment).
        values["cluster.transport"] = environment_setting(TRANSPORT_ENV)
    config = JobConfig.from_fields(values)
    check_typed_flags_apply(args.command, typed, config)
    if args.command in ("train", "worker", "eval"):
        config.check_row_settings_apply()
    return config


_CONNECTING = frozenset({"train", "ps", "worker", "eval"})
"""The commands that make connections, and so read the environment's connection settings."""


def _use_transport(config: JobConfig) -> None:
    """--transport, for this process's channels and those of the processes it starts."""
    from distbelief.wire.channels.shm import apply_job_transport

    apply_job_transport(config.cluster.transport)


def _value_of(config: JobConfig, name: str) -> object:
    """Field ``section.field`` of ``config``."""
    section, field = name.split(".", 1)
    return getattr(getattr(config, section), field)


def _resumed_config(run_dir: Path) -> JobConfig:
    """The config.json of the run ``--resume`` names, as it is before anything changes."""
    try:
        return JobConfig.from_file(run_dir / "config.json")
    except ValueError as e:
        raise argparse.ArgumentError(None, f"argument --resume: {e}") from None


def _reshard_before_resume(
    run_dir: Path, current: int, num_shards: int, changes: dict[str, object]
) -> None:
    """``--resume RUN_DIR --shards N``: the run's checkpoints redistributed over N shards
    first (as ``distbelief reshard`` does), unless it already has N (``current``); once they
    are checked as they are (whole, of the partitioner the job's shards restore, and of the
    model its config.json names), so a refused resume leaves them as they were."""
    if current == num_shards:
        return
    # Loaded as the job's own checks load them: a stop in torch's initialisation (C code)
    # was lost there, or aborted the process.
    import_with_signals_deferred(
        "torch",
        "distbelief.models",
        "distbelief.launch.resume",
        "distbelief.launch.resume_layout",
        "distbelief.launch.reshard",
    )
    from distbelief.launch.reshard import reshard_run
    from distbelief.launch.resume import check_budgets_left, read_run_for_resume
    from distbelief.launch.resume_layout import check_resumed_layout

    resumed = read_run_for_resume(run_dir, changes)
    check_resumed_layout(resumed)
    check_budgets_left(run_dir, resumed)  # a job refused then should find it unchanged
    summary = reshard_run(run_dir, num_shards)
    print(summary.line())


def _run_train(args: argparse.Namespace) -> int:
    if not args.resume:
        return _train_and_report(args, config_from_args(args))
    from distbelief.launch.run_lock import run_dir_locked

    changes = _resume_changes(args)
    # Held from before its config.json is read: a reshard or a job in the folder meanwhile
    # would change what was read, or be taken for one that was cut off.
    with run_dir_locked(Path(args.resume), f"--resume {args.resume}", lend_within=True):
        return _train_and_report(args, _resumed_config_with(args, changes))


def _resume_changes(args: argparse.Namespace) -> dict[str, object]:
    """The fields ``--resume RUN_DIR``'s flags change, once checked against what a resume
    may change (nothing read from the folder but whether it is there)."""
    from distbelief.launch.resume import RESUMABLE_FIELDS
    from distbelief.launch.rundir import missing_run_folder

    changes = {name: value for name, value in vars(args).items() if "." in name}
    if changes.get("cluster.engine", "ray") != "ray":
        # A run resumed on another engine leaves the Ray address it was given behind.
        changes.setdefault("cluster.ray_address", "")
    elif "cluster.engine" in changes:
        # And a run resumed on Ray, the hosts the local launcher placed its processes on
        # (Ray places them): typed with --cluster ray, they are refused as for a new run.
        local = JobConfig().cluster
        changes.setdefault("cluster.shard_hosts", local.shard_hosts)
        changes.setdefault("cluster.worker_host", local.worker_host)
    fixed = [
        name for name in changes if name not in RESUMABLE_FIELDS and name != "cluster.num_shards"
    ]
    # Every refusal comes before the reshard: a refused command leaves the folder as it was.
    if missing := missing_run_folder(args.resume):  # first: the other refusals name it
        raise argparse.ArgumentError(None, f"argument --resume: {args.resume}: {missing}")
    if fixed:
        # A flag typed with the value the run has changes nothing (the run's command typed
        # again, with --resume added): taken, not refused.
        resumed = _resumed_config(Path(args.resume))
        same = [name for name in fixed if _value_of(resumed, name) == changes[name]]
        for name in same:
            fixed.remove(name)
            del changes[name]
    if "optimizer.algorithm" in fixed:
        # First: the refusals of the other algorithm's flags follow from the algorithm kept.
        fixed.insert(0, fixed.pop(fixed.index("optimizer.algorithm")))
    elif fixed:
        _refuse_what_the_runs_algorithm_ignores(Path(args.resume), fixed)
    if fixed:
        raise argparse.ArgumentError(
            None,
            f"argument {flag_of('train', fixed[0])}: a resumed run keeps the value in "
            f"{Path(args.resume) / 'config.json'}",
        )
    return changes


def _refuse_what_the_runs_algorithm_ignores(run_dir: Path, fixed: list[str]) -> None:
    """A flag of ``fixed`` (fields a resume keeps) that the run's algorithm does not use at
    all is refused as a new run's is (``--steps`` of a Sandblaster run: Downpour's, not a
    value the run keeps)."""
    from distbelief.config import algorithm_of_field

    owned = [name for name in fixed if algorithm_of_field(name) is not None]
    if owned:
        kept_from = str(run_dir / "config.json")
        check_typed_flags_apply("train", owned, _resumed_config(run_dir), kept_from)


def _resumed_config_with(args: argparse.Namespace, changes: dict[str, object]) -> JobConfig:
    """``--resume RUN_DIR``'s config: the run's, with ``changes``; the run resharded first
    where ``--shards`` asks for another number of shards."""
    from distbelief.launch.resume import read_run_for_resume

    changes = dict(changes)
    new_shards = changes.pop("cluster.num_shards", None)
    typed = {name for name in vars(args) if "." in name} - {"cluster.num_shards"}
    # The flags against the run's config, as for a new run: a value out of range, or one
    # the resumed job would ignore (--eval-every for a run without live evaluation).
    resumed = _resumed_config(Path(args.resume))
    kept_from = str(Path(args.resume) / "config.json")
    try:
        changed = resumed.with_fields(changes)
    except ConfigFieldError as e:
        # A budget of the other algorithm's (--max-iterations of a Downpour run): ruled out
        # by the algorithm the run keeps, which the message names, as check_typed_flags_apply
        # does.
        if e.problem.startswith("only applies to algorithm") and kept_from not in e.problem:
            raise ConfigFieldError(e.field, f"{e.problem}; as {kept_from} has it") from None
        raise
    check_typed_flags_apply("train", typed, changed, kept_from)
    if new_shards is not None:
        run_dir = Path(args.resume)
        _reshard_before_resume(run_dir, resumed.cluster.num_shards, new_shards, changes)
    return read_run_for_resume(Path(args.resume), changes)


def _train_and_report(args: argparse.Namespace, config: JobConfig) -> int:
    """Runs the job of ``config`` and prints how it ended."""
    from distbelief.launch.job import train
    from distbelief.launch.local import stop_forkserver

    check_device(config)
    if not args.resume and not config.reporting.out_dir:
        # Made here, not in train(), so a failure can name its traceback file in the folder.
        config = config.with_fields({"reporting.out_dir": str(reserve_run_dir())})
    try:
        result = train(config, resume=bool(args.resume))
    except ChildFailedError as e:
        return child_failed(args, e, save_traceback(e, Path(config.reporting.out_dir)))
    finally:
        stop_forkserver()  # nothing of the command outlives it
        release_reserved(Path(config.reporting.out_dir))
    final = result.final
    for line in restore_lines(result.faults, result.run_dir):
        print(line)
    auc = "" if final.get("test_auc") is None else f", test AUC {final['test_auc']:.4f}"
    print(
        f"done in {result.elapsed_s:.1f}s: test accuracy {final.get('test_accuracy', 0):.4f}"
        f"{auc} (parameter server, {versions_said(final)}); run folder {result.run_dir}"
    )
    return 0


def _log_emit(kind: str, payload: object) -> None:
    if kind == "ready" and "shard_id" in payload:
        # One parseable stdout line, so scripts and tests learn the port when binding to :0.
        print(f"serving shard {payload['shard_id']} at {payload['address']}", flush=True)
    elif kind == "ready" and payload.get("address"):
        print(f"stage {payload['stage']} listening at {payload['address']}", flush=True)
    # Heartbeats and pushes come several times a second: only with debug logging.
    quiet = kind in ("heartbeat", "pushed")
    logger.log(logging.DEBUG if quiet else logging.INFO, "%s %s", kind, payload)


def _run_ps(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not 0 <= args.shard_id < config.cluster.num_shards:
        raise ValueError(
            f"--shard-id {args.shard_id} is not in [0, --num-shards {config.cluster.num_shards})"
        )
    args.bind = check_bind_is_here(args.bind)
    check_no_shm_under_tcp("--bind", [args.bind], config)
    security = security_from_args(args)  # a bad key file leaves no --checkpoint-dir behind
    with contextlib.ExitStack() as held:
        if args.checkpoint_dir:
            from distbelief.files import make_folder

            # Made here: a shard refused (its port taken, say) leaves no empty folder, nor the
            # folders above it it made. rmdir removes only an empty one, after the lock file
            # below is gone; the deepest first (the callbacks run last-in first-out).
            for path in reversed(_folders_missing(Path(args.checkpoint_dir))):
                held.callback(_remove_if_empty, path)
            make_folder(args.checkpoint_dir, "--checkpoint-dir")
            _check_serves_a_shards_folder(args.checkpoint_dir)
            # For the shard's life: a second one of this id would write over its checkpoints.
            held.enter_context(shard_checkpoints_locked(args.checkpoint_dir, args.shard_id))
        _use_transport(config)
        # Torch: once the flags are checked, and with a stop meanwhile acted on after it.
        process = import_with_signals_deferred("distbelief.server.process")
        process.serve_job_shard(
            config,
            args.shard_id,
            args.bind,
            security=security,
            checkpoint_dir=args.checkpoint_dir,
            emit=_log_emit,
        )
    return 0


def _check_serves_a_shards_folder(checkpoint_dir: str) -> None:
    """Refuse a ``--checkpoint-dir`` that is a run's, not a shard's: a shard saves into its
    folder, and would change the run's (or, finding nothing there, started empty without a
    word and saved its files among the run's).

    A Sandblaster run's checkpoint folder holds one folder per committed iteration; one of
    those holds the shards' files, but is what ``--resume`` restores: only a copy may be served.
    """
    from distbelief.coordinator.checkpoint import RECORD_FILE, TAG_PREFIX, holds_iterations
    from distbelief.launch.cluster import CHECKPOINT_DIR

    folder = Path(checkpoint_dir)
    named = f"--checkpoint-dir {checkpoint_dir}"
    if holds_iterations(folder):
        raise ValueError(
            f"{named}: holds a Sandblaster run's checkpoints, a folder per committed iteration "
            "(lbfgs-N), not a shard's: serve a copy of one of them (a shard saves into its "
            "folder, and would change the run's)"
        )
    resolved = folder.resolve()
    if resolved.name.startswith(TAG_PREFIX) and (resolved.parent / RECORD_FILE).exists():
        raise ValueError(
            f"{named}: is a committed iteration of a Sandblaster run, which --resume restores: "
            "serve a copy of it (a shard saves into its folder, and would change the run's)"
        )
    if (folder / "config.json").is_file() and (folder / CHECKPOINT_DIR).is_dir():
        raise ValueError(
            f"{named}: is a run folder, not a shard's checkpoint folder: its shards keep "
            f"theirs in {folder / CHECKPOINT_DIR}"
        )


def _folders_missing(folder: Path) -> list[Path]:
    """``folder`` and the folders above it that do not exist (that making it makes), deepest
    first; none where the file system refuses the name (it cannot be made either)."""
    try:
        return [path for path in (folder, *folder.parents) if not path.exists()]
    except OSError:
        return []


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (the shard's checkpoints), or gone
        folder.rmdir()


def _run_worker(args: argparse.Namespace) -> int:
    from distbelief.data.files import require_data_files
    from distbelief.launch.hosts import check_hosts_are_here, check_workers_reach
    from distbelief.wire.channels import split_scheme
    from distbelief.wire.channels.tcp import parse_tcp_address

    config = config_from_args(args)
    check_hosts_are_here(config.cluster, shards=False)
    shards = flag_addresses("--ps", args.ps)
    check_no_shm_under_tcp("--ps", shards, config)
    hosts = [parse_tcp_address(split_scheme(address)[1])[0] for address in shards]
    check_workers_reach(config.cluster.worker_host, hosts)
    require_data_files(config.data, splits=("train",))  # it reads the training split alone
    if not 0 <= args.rank < config.cluster.num_workers:
        raise ValueError(
            f"--rank {args.rank} is not in [0, --num-workers {config.cluster.num_workers})"
        )
    _use_transport(config)
    stage_flags = (args.stage, args.bind, args.next)
    if config.pipeline.num_partitions > 1 or any(flag is not None for flag in stage_flags):
        return _run_stage(args, config)
    check_device(config)
    result = import_with_signals_deferred("distbelief.worker").run_worker(
        config,
        args.rank,
        flag_addresses("--ps", args.ps),
        emit=_log_emit,
        start_time=time.time(),
        security=security_from_args(args),
    )
    print(f"worker {args.rank} done after {result['steps']} steps")
    return 0


def _run_stage(args: argparse.Namespace, config: JobConfig) -> int:
    """``distbelief worker --stage I --partitions P``: one stage of a model-parallel replica."""
    check_stage_flags(args, config.pipeline.num_partitions)
    result = import_with_signals_deferred("distbelief.worker.stage").run_stage_worker(
        config,
        args.rank,
        args.stage,
        flag_addresses("--ps", args.ps),
        emit=_log_emit,
        bind=args.bind or "",
        next_stage=args.next or "",
        start_time=time.time(),
        security=security_from_args(args),
    )
    print(f"worker {args.rank} stage {args.stage} done after {result['steps']} steps")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from distbelief.data.files import require_data_files
    from distbelief.files import check_folder_can_be_made

    config = config_from_args(args)
    if args.once and config.reporting.out_dir:
        # Nothing would go there: --once prints its evaluation, and writes no metrics.csv.
        raise argparse.ArgumentError(None, "argument --out: not used with --once (it prints)")
    if args.once and "reporting.eval_every_s" in vars(args):
        raise argparse.ArgumentError(
            None, "argument --eval-every: not used with --once (it evaluates once)"
        )
    check_no_shm_under_tcp("--ps", flag_addresses("--ps", args.ps), config)
    require_data_files(config.data, splits=("test",))  # it reads the test split alone
    if config.reporting.out_dir:
        check_folder_can_be_made(config.reporting.out_dir, "--out")
        from distbelief.launch.rundir import misplaced_run_entry

        out_dir = Path(config.reporting.out_dir)
        misplaced = misplaced_run_entry(out_dir, files=("metrics.csv",), folders=())
        if misplaced is not None:  # found only once the shards were reached, a bare OSError
            raise ValueError(f"--out {out_dir}: {misplaced}")
    _use_transport(config)
    evaluator = import_with_signals_deferred("distbelief.evaluator")  # torch: once checked
    with _held_while_watched(config.reporting.out_dir):
        result = evaluator.watch_shards(
            config,
            flag_addresses("--ps", args.ps),
            out_dir=config.reporting.out_dir,
            once=args.once,
            security=security_from_args(args),
        )
    print(evaluator.format_result(result))
    return 0


@contextlib.contextmanager
def _held_while_watched(out_dir: str) -> Iterator[None]:
    """An ``eval --out`` folder is held while the watch appends to its metrics.csv, as a job
    holds its run folder: a job running in it (whose launcher writes the same file), or
    another watch, refuses the watch, and the watch refuses them. A folder the watch makes is
    made and held from the start (two watches into one new folder both wrote its metrics.csv),
    and removed at the end if the watch wrote nothing there."""
    if not out_dir:
        yield
        return
    from distbelief.files import make_folder
    from distbelief.launch.run_lock import run_dir_locked

    folder = Path(out_dir)
    made = _folders_missing(folder)
    make_folder(folder, "--out")  # check_folder_can_be_made said it can be
    with run_dir_locked(folder, f"--out {out_dir}"):
        try:
            yield
        finally:
            for path in made:  # still held: no other watch writes there yet
                _remove_if_empty(path)


def _run_plot(args: argparse.Namespace) -> int:
    from distbelief.files import check_folder_can_be_made

    if args.out_dir:  # made by the plotting, once the runs are found
        check_folder_can_be_made(args.out_dir, "--out")
    from distbelief.telemetry import check_metrics_header, has_records

    for run_dir in args.run_dirs:
        # As the launcher does for a run stopped before its first record: PNGs of nothing
        # would only say "no data yet". A folder without metrics.csv (or whose name the file
        # system refuses) is named by the plotting.
        metrics = Path(run_dir) / "metrics.csv"
        with contextlib.suppress(OSError):
            if metrics.is_file() and not has_records(metrics):
                # A 0-byte file (cut off before its header was written) has no header to speak
                # of; a first line that is no header is refused as such.
                empty = metrics.stat().st_size == 0
                if not empty:
                    check_metrics_header(metrics)
                what = "is empty" if empty else "has only its header"
                raise ValueError(f"{run_dir}: no records yet (metrics.csv {what})")
    from distbelief.plots import plot_run, plot_runs  # matplotlib: once the flags are checked

    out_dir = args.out_dir or args.run_dirs[0]
    try:
        if len(args.run_dirs) == 1:
            written = plot_run(args.run_dirs[0], out_dir=out_dir)
        else:
            written = plot_runs(args.run_dirs, out_dir=out_dir)
    except OSError as e:  # a folder the checks above could not see is unwritable (/proc, say)
        # The folder as typed, and the file in it that could not be (a folder by a PNG's name).
        where = f"--out {args.out_dir}" if args.out_dir else args.run_dirs[0]
        what = f" ({Path(e.filename).name})" if e.filename else ""
        raise ValueError(f"{where}: cannot be written: {e.strerror or e}{what}") from None
    print("\n".join(str(path) for path in written))
    return 0


def _run_keygen(args: argparse.Namespace) -> int:
    from distbelief.wire.security import write_key_file

    path = write_key_file(args.path)
    print(f"wrote {path} (readable by you only); pass it with --auth-key-file {shell_word(path)}")
    return 0


def _run_reshard(args: argparse.Namespace) -> int:
    # Torch and safetensors: a Ctrl-C inside their C initialisation was lost there, and the
    # reshard then failed with a traceback (numpy half-loaded) instead of stopping.
    reshard = import_with_signals_deferred("distbelief.launch.reshard")
    summary = reshard.reshard_run(Path(args.run_dir), vars(args)["cluster.num_shards"])
    with signals_deferred(raise_noted=False):  # done: a stop now would only cut its line
        print(summary.line())
    return 0


_COMMANDS = {
    "train": _run_train,
    "ps": _run_ps,
    "worker": _run_worker,
    "eval": _run_eval,
    "plot": _run_plot,
    "keygen": _run_keygen,
    "reshard": _run_reshard,
}


def run(args: argparse.Namespace) -> int:
    """Run the chosen command; returns the process exit code."""
    # The command's own lines only; a library's show from WARNING up. Torch's exit-time INFO
    # (FakeTensor cache statistics) came out after Ctrl-C had stopped torch's import before it
    # set its own loggers' levels.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("distbelief").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if threading.current_thread() is not threading.main_thread():
        return _run_command(args)  # signal handlers belong to the main thread
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    previous_hang_up = stop_on_hang_up()
    # A shell starts a command in the background with SIGINT ignored, and Python then leaves it
    # ignored: a SIGINT sent to this process by its pid must still stop it, as Ctrl-C does.
    interrupt_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if interrupt_ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run_command(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hang_up)
        if interrupt_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_command(args: argparse.Namespace) -> int:
    """The command, its failures turned into the exit code and one line on stderr."""

    def command() -> int:
        if args.command in _CONNECTING:
            check_environment()
        return _COMMANDS[args.command](args)

    return run_reporting_failures(args, command)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))
