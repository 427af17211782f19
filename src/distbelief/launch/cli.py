"""The ``distbelief`` command: parsed flags -> config -> run. Nothing else lives here, and what
it imports to build the parser imports no torch: ``--help`` stays fast.

Exit codes: 0 done, 1 a process failed, 2 bad flags or input, 130 interrupted. Errors are one
line; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from distbelief.config import TRANSPORT_ENV, JobConfig
from distbelief.errors import (
    AuthenticationError,
    BindError,
    ChildFailedError,
    ClusterError,
    ConfigFieldError,
    ConsistencyMismatchError,
    DatasetUnavailableError,
    DistBeliefError,
    LauncherInterrupted,
    ModelMismatchError,
    NotAStageError,
    ShardListError,
    TableSizeMismatchError,
    TableWidthMismatchError,
    TLSMismatchError,
    UnknownOpError,
)
from distbelief.launch.cluster import Fault
from distbelief.launch.deferred_signals import import_with_signals_deferred
from distbelief.launch.flags import (
    check_typed_flags_apply,
    flag_of,
    get_args_parser,
    security_from_args,
    subcommand_parser,
)
from distbelief.launch.run_lock import shard_checkpoints_locked
from distbelief.launch.rundir import run_dir_path

logger = logging.getLogger("distbelief")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


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
        values["cluster.num_shards"] = len(_addresses("--ps", args.ps))
    if "cluster.transport" not in typed and os.environ.get(TRANSPORT_ENV):
        # The job's transport, as the run's config.json records it (checked: _check_environment).
        values["cluster.transport"] = os.environ[TRANSPORT_ENV]
    config = JobConfig.from_fields(values)
    check_typed_flags_apply(args.command, typed, config)
    if args.command in ("train", "worker", "eval"):
        config.check_row_settings_apply()
    return config


def _check_device(config: JobConfig) -> None:
    """Refuse a GPU this machine does not have before any process starts."""
    if config.cluster.device == "cpu":
        return
    from distbelief.worker.run import resolve_device  # torch: only when a GPU is asked for

    try:
        resolve_device(config.cluster.device)
    except ValueError as e:
        raise ConfigFieldError("cluster.device", str(e).partition(": ")[2]) from None


_CONNECTING = frozenset({"train", "ps", "worker", "eval"})
"""The commands that make connections, and so read the environment's connection settings."""


def _check_environment() -> None:
    """The connection settings read from the environment (``DISTBELIEF_TRANSPORT``), checked
    before anything is written or started.

    Raises:
        ValueError: a bad value, named as the variable (no flag set it).
    """
    from distbelief.wire.channels.shm import transport_setting

    transport_setting()


def _addresses(flag: str, text: str, check: Callable[[str], object] | None = None) -> list[str]:
    """The addresses of ``flag``; one that ``check`` refuses (by default: one a dialer refuses,
    malformed, of port 0, or of a host no lookup knows) is an error naming the flag."""
    from distbelief.wire.channels import checked_addresses

    try:
        return checked_addresses(text, check)
    except ValueError as e:
        raise argparse.ArgumentError(None, f"argument {flag}: {e}") from e


def _one_address(flag: str, text: str, check: Callable[[str], object] | None = None) -> str:
    """The one address of ``flag`` (stripped, as --ps's are); a malformed one, or several, is
    an error naming the flag."""
    addresses = _addresses(flag, text, check)
    if len(addresses) > 1:
        raise argparse.ArgumentError(None, f"argument {flag}: one address, not {len(addresses)}")
    return addresses[0]


def _check_bind_is_here(text: str) -> str:
    """--bind: a well-formed address of this machine whose port is free (a foreign address or
    a port another process holds is bad input, not a failure of the server; port 0 takes any
    free one). Returns it, as the server binds it."""
    from distbelief.hosts import check_local_host
    from distbelief.wire.channels import check_scheme, split_scheme
    from distbelief.wire.channels.tcp import TcpListener, parse_tcp_address

    def check_form(address: str) -> None:  # not a dialer's check: port 0 is fine here
        check_scheme(address)
        parse_tcp_address(f"tcp://{split_scheme(address)[1]}")

    address = _one_address("--bind", text, check_form)
    tcp_address = f"tcp://{split_scheme(address)[1]}"  # what the server binds, whatever scheme
    host, _ = parse_tcp_address(tcp_address)
    try:
        check_local_host(host)
        # Before torch loads; a port taken meanwhile is refused the same way (BindError).
        TcpListener(tcp_address).close()
    except (ValueError, BindError) as e:
        raise argparse.ArgumentError(None, f"argument --bind: {e}") from None
    return address


def _check_no_shm_under_tcp(flag: str, addresses: Sequence[str], config: JobConfig) -> None:
    """An shm:// address asks for shared memory, which the transport tcp rules out: with both,
    one of them would be ignored without a word."""
    from distbelief.wire.channels import split_scheme

    if config.cluster.transport != "tcp":
        return
    for address in addresses:
        scheme, rest = split_scheme(address)
        if scheme == "shm":
            raise argparse.ArgumentError(
                None,
                f"argument {flag}: {address} asks for shared memory, which --transport tcp "
                f"(or DISTBELIEF_TRANSPORT=tcp) rules out: give tcp://{rest}, or another "
                "--transport",
            )


def _use_transport(config: JobConfig) -> None:
    """--transport, for this process's channels and those of the processes it starts."""
    from distbelief.wire.channels.shm import apply_job_transport

    apply_job_transport(config.cluster.transport)


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
    from distbelief.launch.reshard import reshard_run
    from distbelief.launch.resume import read_run_for_resume
    from distbelief.launch.resume_layout import check_resumed_layout

    if current != num_shards:
        check_resumed_layout(read_run_for_resume(run_dir, changes))
        summary = reshard_run(run_dir, num_shards)
        print(summary.line())


def _run_train(args: argparse.Namespace) -> int:
    from distbelief.launch.local import stop_forkserver
    from distbelief.launch.resume import RESUMABLE_FIELDS, read_run_for_resume
    from distbelief.launch.train import train

    if args.resume:
        changes = {name: value for name, value in vars(args).items() if "." in name}
        typed = set(changes)
        if changes.get("cluster.engine", "ray") != "ray":
            # A run resumed on another engine leaves the Ray address it was given behind.
            changes.setdefault("cluster.ray_address", "")
        new_shards = changes.pop("cluster.num_shards", None)
        fixed = [name for name in changes if name not in RESUMABLE_FIELDS]
        # Every refusal comes before the reshard: a refused command leaves the folder as it was.
        if fixed:
            raise argparse.ArgumentError(
                None,
                f"argument {flag_of('train', fixed[0])}: a resumed run keeps the value in "
                f"{Path(args.resume) / 'config.json'}",
            )
        if not Path(args.resume).is_dir():
            raise argparse.ArgumentError(
                None, f"argument --resume: {args.resume}: no such run folder"
            )
        # The flags against the run's config, as for a new run: a value out of range, or one
        # the resumed job would ignore (--eval-every for a run without live evaluation).
        resumed = _resumed_config(Path(args.resume))
        typed.discard("cluster.num_shards")
        check_typed_flags_apply("train", typed, resumed.with_fields(changes))
        if new_shards is not None:
            run_dir = Path(args.resume)
            _reshard_before_resume(run_dir, resumed.cluster.num_shards, new_shards, changes)
        config = read_run_for_resume(Path(args.resume), changes)
    else:
        config = config_from_args(args)
        # Fixed here, not in train(), so a failure can name its traceback file in the folder.
        out_dir = str(run_dir_path(config.reporting.out_dir))
        config = config.with_fields({"reporting.out_dir": out_dir})
    _check_device(config)
    try:
        result = train(config, resume=bool(args.resume))
    except ChildFailedError as e:
        return _child_failed(args, e, _save_traceback(e, Path(config.reporting.out_dir)))
    finally:
        stop_forkserver()  # nothing of the command outlives it
    final = result.final
    for line in _restore_lines(result.faults):
        print(line)
    auc = "" if final.get("test_auc") is None else f", test AUC {final['test_auc']:.4f}"
    print(
        f"done in {result.elapsed_s:.1f}s: test accuracy {final.get('test_accuracy', 0):.4f}"
        f"{auc} (parameter server, {_versions_said(final)}); run folder {result.run_dir}"
    )
    return 0


def _versions_said(final: dict) -> str:
    """The final evaluation's version, or a partitioned model's, one per partition: each
    partition's stages push to a version of their own."""
    partitions = final.get("partition_versions")
    if partitions is None:
        return f"version {final.get('version')}"
    return f"partition versions {', '.join(map(str, partitions))}"


def _restore_lines(faults: Sequence[Fault]) -> list[str]:
    """One line per restored shard (or rolled-back coordinator), ``_describe_restore``'s, and
    one per shard whose restarted life died again before it restored anything (its later
    fault has a line of its own)."""
    lines = []
    for i, fault in enumerate(faults):
        if fault.version_restored is not None or fault.updates_redone is not None:
            lines.append(_describe_restore(fault))
        elif (
            fault.process.startswith("shard")
            and fault.action == "restarted"
            and any(later.process == fault.process for later in faults[i + 1 :])
        ):
            lines.append(
                f"{fault.process}: died again before it restored its checkpoint; updates lost "
                "unknown"
            )
    return lines


def _describe_restore(fault: Fault) -> str:
    """What a shard's restart cost: ``shard1: restored version 81; the workers re-sent 44
    updates it lacked and 1 push in flight; 0 updates lost`` (Downpour), or ``shard1: restored
    version 22; the job went back to that checkpoint and redid 2 updates`` (Sandblaster; a
    coordinator's: ``coordinator: the job went back to its last checkpoint and redid 3
    updates``; with nothing since the checkpoint, ``shard1: restored version 22, every update
    it had applied: nothing to redo``)."""
    if fault.version_restored is None:  # the coordinator: its checkpoint has no version
        if fault.updates_redone == 0:
            return f"{fault.process}: its last checkpoint held every update: nothing to redo"
        redid = f"redid {_count(fault.updates_redone, 'update')}"
        return f"{fault.process}: the job went back to its last checkpoint and {redid}"
    text = f"{fault.process}: restored version {fault.version_restored}"
    if fault.rolled_back:
        if fault.updates_redone is not None:
            redone = fault.updates_redone
        else:  # the coordinator did not say (it failed, or had finished): the versions tell
            redone = max(0, (fault.version_before or 0) - fault.version_restored)
        if redone == 0:  # nothing was rolled back (the coordinator had finished, say)
            return text + ", every update it had applied: nothing to redo"
        return text + f"; the job went back to that checkpoint and redid {_count(redone, 'update')}"
    if fault.updates_replayed is not None:
        text += (
            f"; the workers re-sent {_count(fault.updates_replayed, 'update')} it lacked and "
            f"{_count(fault.pushes_resent, 'push', 'pushes')} in flight"
        )
    lost = fault.lost_updates
    if lost is None and fault.recovery_cut_short:
        return text + "; it died again before it counted the workers' replays: updates lost unknown"
    return text + ("" if lost is None else f"; {_count(lost, 'update')} lost")


def _count(number: int | None, one: str, many: str | None = None) -> str:
    """``1 update``, ``2 updates``."""
    return f"{number} {one if number == 1 else many or one + 's'}"


def _save_traceback(error: ChildFailedError, run_dir: Path) -> Path | None:
    """Write a failed child's traceback into the run folder; returns the file (None when the
    detail is one line, or the folder cannot be written)."""
    if "\n" not in error.detail.strip() or not run_dir.is_dir():
        return None
    path = run_dir / f"{error.name.replace(' ', '_')}-traceback.txt"
    try:
        path.write_text(error.detail)
    except OSError as e:
        logger.warning("could not write %s: %s", path, e)
        return None
    return path


def _log_emit(kind: str, payload: object) -> None:
    if kind == "ready" and "shard_id" in payload:
        # One parseable stdout line, so scripts and tests learn the port when binding to :0.
        print(f"serving shard {payload['shard_id']} at {payload['address']}", flush=True)
    elif kind == "ready" and payload.get("address"):
        print(f"stage {payload['stage']} listening at {payload['address']}", flush=True)
    logger.log(logging.DEBUG if kind == "heartbeat" else logging.INFO, "%s %s", kind, payload)


def _run_ps(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not 0 <= args.shard_id < config.cluster.num_shards:
        raise ValueError(
            f"--shard-id {args.shard_id} is not in [0, --num-shards {config.cluster.num_shards})"
        )
    args.bind = _check_bind_is_here(args.bind)
    _check_no_shm_under_tcp("--bind", [args.bind], config)
    security = security_from_args(args)  # a bad key file leaves no --checkpoint-dir behind
    with contextlib.ExitStack() as held:
        if args.checkpoint_dir:
            from distbelief.files import make_folder

            make_folder(args.checkpoint_dir, "--checkpoint-dir")
            # For the shard's life: a second one of this id would write over its checkpoints.
            held.enter_context(shard_checkpoints_locked(Path(args.checkpoint_dir), args.shard_id))
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


def _run_worker(args: argparse.Namespace) -> int:
    from distbelief.data.files import require_data_files
    from distbelief.launch.hosts import check_hosts_are_here, check_workers_reach
    from distbelief.wire.channels import split_scheme
    from distbelief.wire.channels.tcp import parse_tcp_address

    config = config_from_args(args)
    check_hosts_are_here(config.cluster, shards=False)
    shards = _addresses("--ps", args.ps)
    _check_no_shm_under_tcp("--ps", shards, config)
    hosts = [parse_tcp_address(split_scheme(address)[1])[0] for address in shards]
    check_workers_reach(config.cluster.worker_host, hosts)
    require_data_files(config.data)
    if not 0 <= args.rank < config.cluster.num_workers:
        raise ValueError(
            f"--rank {args.rank} is not in [0, --num-workers {config.cluster.num_workers})"
        )
    _use_transport(config)
    stage_flags = (args.stage, args.bind, args.next)
    if config.pipeline.num_partitions > 1 or any(flag is not None for flag in stage_flags):
        return _run_stage(args, config)
    _check_device(config)
    result = import_with_signals_deferred("distbelief.worker").run_worker(
        config,
        args.rank,
        _addresses("--ps", args.ps),
        emit=_log_emit,
        start_time=time.time(),
        security=security_from_args(args),
    )
    print(f"worker {args.rank} done after {result['steps']} steps")
    return 0


def _check_stage_flags(args: argparse.Namespace, num_stages: int) -> None:
    """--stage, --bind and --next: each given where it is used, and only there. Stages after
    the first listen (--bind) for the one before; stages before the last dial the next
    (--next)."""
    if num_stages == 1:
        given = (("--stage", args.stage), ("--bind", args.bind), ("--next", args.next))
        flag, value = next((flag, value) for flag, value in given if value is not None)
        raise ValueError(
            f"{flag} {value}: only applies to a stage of a partitioned replica (--partitions)"
        )
    if args.stage is None:
        raise ValueError(
            f"--stage is required with --partitions {num_stages} (the partition this process "
            f"runs, in [0, {num_stages}))"
        )
    if not 0 <= args.stage < num_stages:
        raise ValueError(f"--stage {args.stage} is not in [0, --partitions {num_stages})")
    if args.stage < num_stages - 1 and not args.next:
        raise ValueError(
            f"--stage {args.stage} needs --next (the address of stage {args.stage + 1})"
        )
    if args.stage == num_stages - 1 and args.next:
        raise ValueError(f"--next {args.next}: the last stage has no next stage")
    if args.stage == 0 and args.bind:
        raise ValueError(f"--bind {args.bind}: the first stage does not listen (it dials --next)")
    if args.stage > 0 and not args.bind:
        raise ValueError(
            f"--stage {args.stage} needs --bind (where stage {args.stage - 1} connects)"
        )
    if args.next:
        args.next = _one_address("--next", args.next)
    if args.bind:
        args.bind = _check_bind_is_here(args.bind)


def _run_stage(args: argparse.Namespace, config: JobConfig) -> int:
    """``distbelief worker --stage I --partitions P``: one stage of a model-parallel replica."""
    _check_stage_flags(args, config.pipeline.num_partitions)
    result = import_with_signals_deferred("distbelief.worker.stage").run_stage_worker(
        config,
        args.rank,
        args.stage,
        _addresses("--ps", args.ps),
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
    _check_no_shm_under_tcp("--ps", _addresses("--ps", args.ps), config)
    require_data_files(config.data)
    if config.reporting.out_dir:
        check_folder_can_be_made(config.reporting.out_dir, "--out")
    _use_transport(config)
    evaluator = import_with_signals_deferred("distbelief.evaluator")  # torch: once checked
    result = evaluator.watch_shards(
        config,
        _addresses("--ps", args.ps),
        out_dir=config.reporting.out_dir,
        once=args.once,
        security=security_from_args(args),
    )
    print(evaluator.format_result(result))
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from distbelief.files import check_folder_can_be_made

    if args.out_dir:  # made by the plotting, once the runs are found
        check_folder_can_be_made(args.out_dir, "--out")
    from distbelief.plots import plot_run, plot_runs  # matplotlib: once the flags are checked

    out_dir = args.out_dir or args.run_dirs[0]
    try:
        if len(args.run_dirs) == 1:
            written = plot_run(args.run_dirs[0], out_dir=out_dir)
        else:
            written = plot_runs(args.run_dirs, out_dir=out_dir)
    except OSError as e:  # a folder the checks above could not see is unwritable (/proc, say)
        raise ValueError(f"{e.filename or out_dir}: cannot be written: {e.strerror or e}") from None
    print("\n".join(str(path) for path in written))
    return 0


def _run_keygen(args: argparse.Namespace) -> int:
    from distbelief.wire.security import write_key_file

    path = write_key_file(args.path)
    print(f"wrote {path} (readable by you only); pass it with --auth-key-file {path}")
    return 0


def _run_reshard(args: argparse.Namespace) -> int:
    from distbelief.launch.reshard import reshard_run

    print(reshard_run(Path(args.run_dir), vars(args)["cluster.num_shards"]).line())
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


def _usage_error(args: argparse.Namespace, message: str) -> int:
    """Report a bad flag found after parsing the way argparse reports one it finds."""
    parser = subcommand_parser(args.command)
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _config_error(args: argparse.Namespace, error: ConfigFieldError) -> int:
    typed = error.field in vars(args) or not getattr(args, "resume", None)
    flag = flag_of(args.command, error.field) if typed else None
    if flag is None and "." not in error.field and error.field in vars(args):
        flag = f"--{error.field.replace('_', '-')}"  # a command's own flag (worker --rank)
    if flag is None:  # a value the user did not type (e.g. read from a run folder)
        said = str(error)
        if not typed:  # the resumed run's: where it comes from (a Ray head gone since, say)
            config_file = Path(args.resume) / "config.json"
            said = f"{error.field} (in {config_file}): {error.problem}"
        print(f"distbelief {args.command}: error: {said}", file=sys.stderr)
        return EXIT_USAGE
    return _usage_error(args, f"argument {flag}: {error.problem}")


def _cluster_refused(args: argparse.Namespace, error: ClusterError) -> int:
    """A cluster that refuses a setting of the job (no Ray head at --ray-address, too few CPUs
    for --workers) as that setting's flag, the way a bad flag is reported; other failures of
    the cluster engine as they are."""
    prefix = f"distbelief {args.command}"
    if error.field is None:
        print(f"{prefix}: ClusterError: {error}", file=sys.stderr)
        return EXIT_FAILED
    typed = error.field in vars(args) or not getattr(args, "resume", None)
    flag = flag_of(args.command, error.field) if typed else None
    said = error.problem if flag is None else f"argument {flag}: {error.problem}"
    print(f"{prefix}: error: {said}", file=sys.stderr)
    return EXIT_USAGE


def _mismatch_said(error: ConsistencyMismatchError) -> str:
    """The mismatch as the flag that sets it: ``ps``'s (the shards' consistency flags, and the
    round size, ``--num-workers`` on ``ps`` and ``worker`` alike)."""
    flag = flag_of("ps", error.field) if error.field else None
    return str(error) if flag is None else f"argument {flag}: {error.problem}"


def _child_failed(
    args: argparse.Namespace, error: ChildFailedError, traceback_file: Path | None = None
) -> int:
    """One line naming the child and its error (its whole traceback with --verbose)."""
    prefix = f"distbelief {args.command}"
    if args.verbose:
        print(f"{prefix}: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{prefix}: {error.short()}", file=sys.stderr)
    if traceback_file is not None:
        print(f"{prefix}: full traceback in {traceback_file} (or rerun with -v)", file=sys.stderr)
    return EXIT_FAILED


def _traceback_if_verbose(args: argparse.Namespace) -> None:
    if args.verbose:
        traceback.print_exc()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: ``ps`` saves its checkpoint on the way out, a worker
    closes its connections, every ``finally`` runs (the default action would end the process
    where it stands)."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(f"stopped by signal {signal.Signals(signum).name}")


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
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    # A shell starts a command in the background with SIGINT ignored, and Python then leaves it
    # ignored: a SIGINT sent to this process by its pid must still stop it, as Ctrl-C does.
    interrupt_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if interrupt_ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run_command(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if interrupt_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_command(args: argparse.Namespace) -> int:
    """The command, its failures turned into the exit code and one line on stderr."""
    prefix = f"distbelief {args.command}"
    try:
        if args.command in _CONNECTING:
            _check_environment()
        return _COMMANDS[args.command](args)
    except ConfigFieldError as e:
        _traceback_if_verbose(args)
        return _config_error(args, e)
    except argparse.ArgumentError as e:
        _traceback_if_verbose(args)
        return _usage_error(args, str(e))
    except ValueError as e:
        _traceback_if_verbose(args)
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ChildFailedError as e:
        return _child_failed(args, e)
    except AuthenticationError as e:
        _traceback_if_verbose(args)
        key_file = getattr(args, "auth_key_file", None)
        hint = (
            f"--auth-key-file {key_file} is not this job's key"
            if key_file
            else "with --auth-key-file FILE"
        )
        named = isinstance(e, TLSMismatchError) or "--auth-key-file" in str(e)  # its flag
        said = str(e) if named else f"{e} ({hint})"
        print(f"{prefix}: error: {said}", file=sys.stderr)
        return EXIT_USAGE
    except NotAStageError as e:  # only --next names a stage to dial
        _traceback_if_verbose(args)
        print(f"{prefix}: error: argument --next: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UnknownOpError as e:
        _traceback_if_verbose(args)
        if not getattr(args, "ps", None):
            raise
        # The address answered, as another kind of server (a pipeline stage, say).
        print(f"{prefix}: error: argument --ps: {e}: give the shards' addresses", file=sys.stderr)
        return EXIT_USAGE
    except ShardListError as e:  # only --ps names shards by hand
        _traceback_if_verbose(args)
        print(f"{prefix}: error: argument --ps: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConsistencyMismatchError as e:
        _traceback_if_verbose(args)
        print(f"{prefix}: error: {_mismatch_said(e)}", file=sys.stderr)
        return EXIT_USAGE
    except ModelMismatchError as e:  # the shards hold another model than the flags describe
        _traceback_if_verbose(args)
        # A partition (a stage's, or one the evaluator pulls) is cut by --split-points too:
        # another split is another layout.
        partitioned = (vars(args).get("pipeline.num_partitions") or 1) > 1
        flags = "--model, --split-points" if partitioned else "--model"
        # A table's size or width comes with where it came from (--table-size, --data-dir,
        # --embedding-dim).
        named = isinstance(e, (TableSizeMismatchError, TableWidthMismatchError))
        named = named or "--partitions" in str(e)
        hint = "" if named else f" (give the job's {flags} and its flags)"
        print(f"{prefix}: error: {e}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"{prefix}: {str(e) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LauncherInterrupted as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ClusterError as e:
        _traceback_if_verbose(args)
        return _cluster_refused(args, e)
    except DatasetUnavailableError as e:
        _traceback_if_verbose(args)  # files missing from --data-dir: bad input, as with the example
        return _usage_error(args, f"argument --data-dir: {e}")
    except DistBeliefError as e:
        _traceback_if_verbose(args)
        if isinstance(e, BindError) and getattr(args, "bind", None):
            # ps, or a worker's stage: its port was taken after _check_bind_is_here
            return _usage_error(args, f"argument --bind: {e}")
        print(f"{prefix}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))
