"""A command's failures as its exit code and one line on stderr: a bad flag or input as
argparse reports one (naming the flag as the user typed it, exit 2), a failed process as its
name and error (exit 1), as is a file it could not write, an interruption (exit 130).
``--verbose`` adds the traceback. It only reports: the commands themselves live in ``cli.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

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
    NotAPeerError,
    NotAStageError,
    ShardEmptyError,
    ShardListError,
    TableSizeMismatchError,
    TableWidthMismatchError,
    TLSMismatchError,
    UnknownOpError,
)
from distbelief.files import write_text_atomic
from distbelief.launch.console import EXIT_INTERRUPTED
from distbelief.launch.flags import flag_of, subcommand_parser
from distbelief.launch.rundir import TRACEBACK_SUFFIX

logger = logging.getLogger("distbelief")

EXIT_FAILED = 1
EXIT_USAGE = 2


def save_traceback(error: ChildFailedError, run_dir: Path) -> Path | None:
    """Write a failed child's traceback into the run folder; returns the file (None when the
    detail is one line, or the folder cannot be written)."""
    if "\n" not in error.detail.strip() or not run_dir.is_dir():
        return None
    path = run_dir / f"{error.name.replace(' ', '_')}{TRACEBACK_SUFFIX}"
    try:
        write_text_atomic(path, error.detail)  # a full disk leaves no empty file behind
    except OSError as e:
        logger.warning("could not write %s: %s", path, e)
        return None
    return path


def usage_error(args: argparse.Namespace, message: str) -> int:
    """Report a bad flag found after parsing the way argparse reports one it finds."""
    parser = subcommand_parser(args.command)
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


_WAYS_OUT_OF_A_RUNS_SETTING = {
    "cluster.ray_address": (
        "give --ray-address HOST:PORT of its cluster now, or --ray-address local to resume it on "
        "this machine alone"
    ),
}
"""A resumed run's setting that may no longer hold (its cluster gone): the flag that
overrides it."""


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
            if error.field in _WAYS_OUT_OF_A_RUNS_SETTING:
                said += f": {_WAYS_OUT_OF_A_RUNS_SETTING[error.field]}"
            elif error.field == "data.data_dir" and _relative_data_dir(config_file):
                # config.json keeps the folder as typed: a relative one is read from here.
                said += (
                    f" (a relative --data-dir is read from the folder the resume runs in, "
                    f"{Path.cwd()}: resume from the folder the run started in)"
                )
        print(f"distbelief {args.command}: error: {said}", file=sys.stderr)
        return EXIT_USAGE
    return usage_error(args, f"argument {flag}: {_as_typed(args, flag, error)}")


def _stop_under_way(error: KeyboardInterrupt) -> str | None:
    """What the stop that a second Ctrl-C (``error``) cut short was recorded as (a job's
    ``LauncherInterrupted``, whose words summary.json's reason has), or None."""
    earlier = error.__context__
    while earlier is not None and not isinstance(earlier, LauncherInterrupted):
        earlier = earlier.__context__
    return None if earlier is None else str(earlier)


def _relative_data_dir(config_file: Path) -> bool:
    """Whether ``config_file`` (a run's config.json) names a relative data folder."""
    try:
        data_dir = json.loads(config_file.read_text())["data"]["data_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(data_dir, str) and bool(data_dir) and not Path(data_dir).is_absolute()


def _as_typed(args: argparse.Namespace, flag: str, error: ConfigFieldError) -> str:
    """``error``'s problem quoting the number it refuses as typed (``got 0``, ``got 1e309``),
    not as parsed (``got 0.0``, ``got inf``)."""
    value = vars(args).get(error.field)
    said = f"got {value!r}"
    typed = _last_typed(getattr(args, "argv", None) or [], flag)
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if typed is None or not numeric or not error.problem.endswith(said):
        return error.problem
    return f"{error.problem.removesuffix(said)}got {typed}"


def _last_typed(argv: list[str], flag: str) -> str | None:
    """The text given to ``flag`` the last time ``argv`` has it (argparse keeps the last)."""
    typed = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == flag and i + 1 < len(argv):
            typed = argv[i + 1]
        elif arg.startswith(f"{flag}="):
            typed = arg.partition("=")[2]
    return typed


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


def child_failed(
    args: argparse.Namespace, error: ChildFailedError, traceback_file: Path | None = None
) -> int:
    """One line naming the child and its error (its whole traceback with --verbose)."""
    prefix = f"distbelief {args.command}"
    if args.verbose:
        print(f"{prefix}: {error}", file=sys.stderr)
        _name_the_timeout(prefix, error.error())
        return EXIT_FAILED
    print(f"{prefix}: {error.short()}", file=sys.stderr)
    _name_the_timeout(prefix, error.error())
    if traceback_file is not None:
        print(f"{prefix}: full traceback in {traceback_file} (or rerun with -v)", file=sys.stderr)
    return EXIT_FAILED


def _name_the_timeout(prefix: str, error: str) -> None:
    """A request that timed out waited the request timeout, which the error line, printed as
    summary.json's reason has it, does not name (a --timeout too short for the peers looked
    like a peer too slow): a line that names its flag."""
    if _TIMED_OUT.search(error):
        print(f"{prefix}: a request waits --timeout seconds for its answer", file=sys.stderr)


_TIMED_OUT = re.compile(
    r"^[\w.]*TimeoutError: .* timed out after \S+s(?! connecting)", re.MULTILINE
)
"""A request that waited its answer in vain (connecting has a limit of its own, 5 s at most)."""


def _traceback_if_verbose(args: argparse.Namespace) -> None:
    if args.verbose:
        traceback.print_exc()


def run_reporting_failures(args: argparse.Namespace, command: Callable[[], int]) -> int:
    """``command()`` (the command ``args`` name), its failures turned into the exit code and
    one line on stderr; a failure it does not know is raised as it is."""
    prefix = f"distbelief {args.command}"
    try:
        return command()
    except ConfigFieldError as e:
        _traceback_if_verbose(args)
        return _config_error(args, e)
    except argparse.ArgumentError as e:
        _traceback_if_verbose(args)
        return usage_error(args, str(e))
    except ShardEmptyError as e:  # a ValueError too, but of the shards' state, not the flags
        _traceback_if_verbose(args)
        print(f"{prefix}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as e:
        _traceback_if_verbose(args)
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ChildFailedError as e:
        return child_failed(args, e)
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
    except (UnknownOpError, NotAPeerError) as e:
        _traceback_if_verbose(args)
        if not getattr(args, "ps", None):
            raise
        # The address answered, as another kind of server (a pipeline stage, say) or as
        # another program (a web server, say).
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
        if vars(args).get("embeddings.tables") is not None:
            flags += ", --tables"  # which tables are rows on the shards, which dense
        # A table's size or width comes with where it came from (--table-size, --data-dir,
        # --embedding-dim).
        named = isinstance(e, (TableSizeMismatchError, TableWidthMismatchError))
        named = named or "--partitions" in str(e)
        hint = "" if named else f" (give the job's {flags} and its flags)"
        print(f"{prefix}: error: {e}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        said = _stop_under_way(e)
        print(f"{prefix}: {said or str(e) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LauncherInterrupted as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ClusterError as e:
        _traceback_if_verbose(args)
        return _cluster_refused(args, e)
    except DatasetUnavailableError as e:
        _traceback_if_verbose(args)  # files missing from --data-dir: bad input, as with the example
        return usage_error(args, f"argument --data-dir: {e}")
    except DistBeliefError as e:
        _traceback_if_verbose(args)
        if isinstance(e, BindError) and getattr(args, "bind", None):
            # ps, or a worker's stage: its port was taken after check_bind_is_here
            return usage_error(args, f"argument --bind: {e}")
        print(f"{prefix}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        # A file the command could not write (a shard's last checkpoint in a folder made
        # read-only, or on a full disk): the file and why, as a failed process is said.
        _traceback_if_verbose(args)
        print(f"{prefix}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
