"""The ``distbelief`` command's flags: the config's fields become flags (type, choices and help
from the field and its docstring), plus each subcommand's own flags; and the wire security a
manual role's flags describe. Parsing only: nothing here runs anything or imports torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import re
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from distbelief import config as config_module
from distbelief.config import JobConfig
from distbelief.errors import ConfigFieldError
from distbelief.launch.parser import CommandParser, subcommands

if TYPE_CHECKING:
    from distbelief.wire.security import WireSecurity

FLAGS: dict[str, str] = {
    "cluster.num_workers": "--workers",
    "cluster.num_shards": "--shards",
    "cluster.threads_per_worker": "--threads",
    "cluster.device": "--device",
    "cluster.shard_hosts": "--shard-hosts",
    "cluster.worker_host": "--worker-host",
    "cluster.transport": "--transport",
    "cluster.engine": "--cluster",
    "cluster.ray_address": "--ray-address",
    "data.name": "--dataset",
    "data.data_dir": "--data-dir",
    "data.download": "--no-download",
    "data.table_size": "--table-size",
    "model.name": "--model",
    "model.seed": "--seed",
    "model.embedding_dim": "--embedding-dim",
    "optimizer.algorithm": "--algorithm",
    "optimizer.lr": "--lr",
    "optimizer.n_push": "--n-push",
    "optimizer.n_pull": "--n-pull",
    "optimizer.batch_size": "--batch-size",
    "optimizer.steps": "--steps",
    "optimizer.epochs": "--epochs",
    "optimizer.blocking": "--blocking",
    "optimizer.warmstart_steps": "--warmstart-steps",
    "optimizer.wire_dtype": "--wire-dtype",
    "optimizer.push_compression": "--push-compression",
    "server.optimizer": "--server-optimizer",
    "server.lr": "--server-lr",
    "server.momentum": "--server-momentum",
    "server.betas": "--server-betas",
    "server.eps": "--server-eps",
    "server.checkpoint_every_s": "--checkpoint-every",
    "server.design": "--server-design",
    "server.max_connections": "--max-connections",
    "server.threads": "--server-threads",
    "consistency.sync": "--sync",
    "consistency.backup_workers": "--backup-workers",
    "consistency.max_staleness": "--max-staleness",
    "consistency.staleness_policy": "--staleness-policy",
    "consistency.dc_lambda": "--dc-lambda",
    "consistency.liveness_timeout_s": "--liveness-timeout",
    "sandblaster.history": "--history",
    "sandblaster.portions": "--portions",
    "sandblaster.line_search": "--line-search",
    "sandblaster.max_iterations": "--max-iterations",
    "sandblaster.max_evaluations": "--max-evaluations",
    "sandblaster.step_size": "--step-size",
    "sandblaster.portions_per_push": "--portions-per-push",
    "sandblaster.backup_tasks": "--no-backup-tasks",
    "pipeline.num_partitions": "--partitions",
    "pipeline.num_micro_batches": "--micro-batches",
    "pipeline.schedule": "--schedule",
    "pipeline.split_points": "--split-points",
    "pipeline.max_stage_bytes": "--max-stage-bytes",
    "embeddings.tables": "--tables",
    "embeddings.row_optimizer": "--row-optimizer",
    "embeddings.row_lr": "--row-lr",
    "embeddings.admit_after": "--admit-after",
    "embeddings.max_rows_per_shard": "--max-rows-per-shard",
    "embeddings.row_ttl_steps": "--row-ttl-steps",
    "embeddings.row_init_std": "--row-init-std",
    "embeddings.row_cache_mb": "--row-cache-mb",
    "faults.timeout_s": "--timeout",
    "faults.retry_timeout_s": "--retry-timeout",
    "faults.max_restarts": "--max-restarts",
    "reporting.out_dir": "--out",
    "reporting.eval_every_s": "--eval-every",
    "reporting.eval_during_training": "--no-eval",
    "reporting.draw_plots": "--no-plots",
}
"""Config field -> the flag users type for it (a field not here has no flag)."""

COMMAND_FIELDS: dict[str, tuple[str, ...]] = {
    "train": (
        "cluster",
        "data",
        "model",
        "optimizer",
        "server",
        "consistency",
        "sandblaster",
        "pipeline",
        "embeddings",
        "faults",
        "reporting",
    ),
    "ps": (
        "cluster.num_shards",
        "cluster.num_workers",
        "cluster.transport",
        "server",
        "consistency",
        "embeddings.row_optimizer",
        "embeddings.row_lr",
        "embeddings.admit_after",
        "embeddings.max_rows_per_shard",
        "embeddings.row_ttl_steps",
        "embeddings.row_init_std",
    ),
    "worker": (
        "cluster.num_workers",
        "cluster.threads_per_worker",
        "cluster.device",
        "cluster.worker_host",
        "cluster.transport",
        "data",
        "model",
        "optimizer.lr",
        "optimizer.n_push",
        "optimizer.n_pull",
        "optimizer.batch_size",
        "optimizer.steps",
        "optimizer.epochs",
        "optimizer.blocking",
        "optimizer.warmstart_steps",
        "optimizer.wire_dtype",
        "optimizer.push_compression",
        "pipeline",
        "embeddings.tables",
        "embeddings.row_cache_mb",
        "faults.timeout_s",
        "faults.retry_timeout_s",
    ),
    "eval": (
        "cluster.transport",
        "data",
        "model",
        "pipeline.num_partitions",
        "pipeline.split_points",
        "embeddings.tables",
        "faults.timeout_s",
        "faults.retry_timeout_s",
        "reporting.eval_every_s",
        "reporting.out_dir",
    ),
    "reshard": ("cluster.num_shards",),
}
"""The config fields each subcommand takes as flags (a section: each of its fields in FLAGS)."""

_SPLIT_POINTS_OF_THE_JOB = (
    "Layers at which the job's model is cut, comma-separated: the job's own (its run's "
    "config.json, pipeline.split_points), or the shards refuse the partitions' layout "
    "(default: balance the partitions' parameter bytes, as every process without them does; "
    "train's default balances measured time)."
)
"""The help of --split-points where it names a running job's split (a stage's, eval's)."""

_MANUAL_ROLE_FLAGS: dict[str, dict[str, dict[str, Any]]] = {
    "ps": {
        "cluster.num_shards": {"flag": "--num-shards", "required": True},
        # A manual shard serves one worker unless told otherwise (a sync round's size).
        "cluster.num_workers": {"flag": "--num-workers", "default": 1},
    },
    "worker": {
        "cluster.num_workers": {"flag": "--num-workers", "required": True},
        "pipeline.split_points": {"help": _SPLIT_POINTS_OF_THE_JOB},
    },
    "eval": {
        "pipeline.split_points": {"help": _SPLIT_POINTS_OF_THE_JOB},
        # eval makes no run folder of its own: without --out its evaluations are only logged.
        "reporting.out_dir": {
            "help": "Folder whose metrics.csv eval appends its evaluations to (default: none, "
            "they are only logged; not with --once)."
        },
    },
    "reshard": {
        "cluster.num_shards": {
            "flag": "--shards",
            "required": True,
            "help": "The number of shards to rewrite the run's checkpoints for.",
        }
    },
}
"""How a command's flags differ from ``train``'s: flag names, required or default, help."""

_EXCLUSIVE = (("optimizer.steps", "optimizer.epochs"),)

_SWITCHED_BACK_ON = {
    "reporting.eval_during_training": (
        "--eval",
        "Evaluate while the workers train (the default): a resumed run keeps its --no-eval "
        "unless this flag turns it back on.",
    ),
    "reporting.draw_plots": (
        "--plots",
        "Draw the run folder's PNGs when the job ends (the default): a resumed run keeps its "
        "--no-plots unless this flag turns it back on.",
    ),
}
"""Switches a flag turns off whose setting a resumed run keeps: the flag that turns each one
back on, and its help."""


class _UsedOnlyWith(NamedTuple):
    fields: tuple[str, ...]
    """The fields whose flags make the flag do something (any one of them)."""
    condition: str
    """What those flags must say, after the last one's name (``" > 1"``), if anything."""
    applies: Callable[[JobConfig], bool]
    problem: Callable[[JobConfig], str] | None = None
    """The refusal in the words the config uses for a value other than the default (None:
    ``only used with <flags><condition>``)."""


def _algorithm_fields() -> dict[str, str]:
    """``section.field`` -> the one algorithm that uses it (fields both use are not listed)."""
    return {
        path: owner
        for path in JobConfig().to_fields()
        if (owner := config_module.algorithm_of_field(path)) is not None
    }


def _algorithm_rule(algorithm: str) -> _UsedOnlyWith:
    return _UsedOnlyWith(
        ("optimizer.algorithm",),
        f" {algorithm}",
        lambda job: job.optimizer.algorithm == algorithm,
        lambda job: f"only applies to algorithm {algorithm}, not {job.optimizer.algorithm}",
    )


_ALGORITHM_RULES: dict[str, _UsedOnlyWith] = {
    # What the config refuses at any other value than the default; typed at the default, the
    # algorithm chosen would ignore it as silently.
    path: _algorithm_rule(algorithm)
    for path, algorithm in _algorithm_fields().items()
}
"""Fields only one algorithm uses: checked before ``_USED_ONLY_WITH``, whose rule for the same
field would point at another flag the algorithm refuses too (``--server-momentum`` under
Sandblaster: not ``--server-optimizer momentum``)."""

_USED_ONLY_WITH: dict[str, _UsedOnlyWith] = {
    "reporting.eval_every_s": _UsedOnlyWith(
        ("reporting.eval_during_training",),
        "",
        lambda job: job.reporting.eval_during_training,
        lambda job: "not used with --no-eval (nothing is evaluated while the workers train)",
    ),
    "consistency.liveness_timeout_s": _UsedOnlyWith(
        ("consistency.sync", "consistency.max_staleness"),
        "",
        lambda job: job.consistency.sync or job.consistency.max_staleness is not None,
    ),
    "consistency.backup_workers": _UsedOnlyWith(
        ("consistency.sync",), "", lambda job: job.consistency.sync
    ),
    "consistency.dc_lambda": _UsedOnlyWith(
        ("consistency.staleness_policy",),
        " dc-asgd",
        lambda job: job.consistency.staleness_policy == "dc-asgd",
        # In the config's words: typed at its default or not, the same refusal.
        lambda job: config_module.dc_lambda_unused(job.consistency.staleness_policy),
    ),
    # In the config's words, as typed at another value than the default.
    "pipeline.schedule": _UsedOnlyWith(
        ("pipeline.num_partitions",),
        " > 1",
        lambda job: job.pipeline.num_partitions > 1,
        lambda job: (
            f"only applies to partitioned replicas (partitions > 1), got {job.pipeline.schedule}"
        ),
    ),
    "pipeline.num_micro_batches": _UsedOnlyWith(
        ("pipeline.num_partitions",),
        " > 1",
        lambda job: job.pipeline.num_partitions > 1,
        lambda job: (
            f"only applies to partitioned replicas (partitions > 1), got "
            f"{job.pipeline.num_micro_batches}"
        ),
    ),
    **{
        f"server.{name}": _UsedOnlyWith(
            ("server.optimizer",),
            f" {' or '.join(users)}",
            lambda job, users=users: job.server.optimizer in users,
            lambda job, users=users: config_module.unused_server_setting(
                users, job.server.optimizer
            ),
        )
        for name, users in config_module.SERVER_OPTIMIZER_SETTINGS.items()
    },
}
"""Fields whose flag does something only beside another flag. The config refuses a value of
theirs that differs from the default where it would go unused; a flag typed with the default
value would still be ignored without a word, so the command line refuses it by itself."""


def check_typed_flags_apply(
    command: str, typed: Collection[str], job: JobConfig, kept_from: str | None = None
) -> None:
    """Refuse a flag ``command`` was given (``typed``: the fields of the flags typed) that
    ``job`` does not use. ``kept_from``: the config file a resumed ``job`` keeps its other
    settings from, named when the setting that rules the flag out was not typed.

    Raises:
        ConfigFieldError: the first such flag's field, with the flags it needs.
    """
    rules = [*_ALGORITHM_RULES.items(), *_USED_ONLY_WITH.items()]
    for path, rule in rules:
        if path in typed and not rule.applies(job):
            if rule.problem is not None:
                problem = rule.problem(job)
            else:
                needed = " or ".join(flag_of(command, f) or FLAGS[f] for f in rule.fields)
                problem = f"only used with {needed}{rule.condition}"
            if kept_from is not None and not set(typed) & set(rule.fields):
                problem += f"; as {kept_from} has it"
                back_on = [_SWITCHED_BACK_ON[f][0] for f in rule.fields if f in _SWITCHED_BACK_ON]
                if back_on:
                    problem += f" ({back_on[0]} turns it back on)"
            raise ConfigFieldError(path, problem)


def command_flags(command: str) -> dict[str, str]:
    """Flag -> config field of every config flag of ``command``."""
    return {_flag(command, path): path for path in _command_paths(command)}


def flag_of(command: str, path: str) -> str | None:
    """The flag that sets config field ``path`` in ``command``, if it has one."""
    return _flag(command, path) if path in _command_paths(command) else None


def _flag(command: str, path: str) -> str:
    return _MANUAL_ROLE_FLAGS.get(command, {}).get(path, {}).get("flag", FLAGS[path])


def _command_paths(command: str) -> list[str]:
    wanted = COMMAND_FIELDS.get(command, ())
    return [
        path
        for path in JobConfig().to_fields()
        if path in FLAGS and (path in wanted or path.partition(".")[0] in wanted)
    ]


@functools.cache
def field_docs() -> dict[str, str]:
    """``section.field`` -> the docstring below the field in ``distbelief/config.py``, and
    ``section`` -> the section class's docstring, whitespace collapsed."""
    tree = ast.parse(Path(str(config_module.__file__)).read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    docs: dict[str, str] = {}
    for section in dataclasses.fields(JobConfig):
        node = classes[section.type if isinstance(section.type, str) else section.type.__name__]
        docs[section.name] = " ".join((ast.get_docstring(node) or "").split())
        for statement, following in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                text = " ".join(following.value.value.split())
                docs[f"{section.name}.{statement.target.id}"] = text
    return docs


_INTEGER = re.compile(r"[+-]?[0-9]+")
_REAL = re.compile(r"[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|inf|infinity|nan)", re.I)


def _integer(text: str) -> int:
    """An integer as typed, in ASCII digits: ``int()`` also reads another script's digits
    (``٣``), ``_`` between digits (``1_0`` ran 10 workers) and spaces around them."""
    if not _INTEGER.fullmatch(text):
        raise ValueError(text)
    return int(text)


def _real(text: str) -> float:
    """A number as typed, as ``_integer`` reads one (``inf`` and ``nan`` too: the settings'
    own checks refuse them by name)."""
    if not _REAL.fullmatch(text):
        raise ValueError(text)
    return float(text)


# argparse names a type in its refusal ("invalid int value: 'x'") by the function's name.
_integer.__name__, _real.__name__ = "int", "float"


def _pair_of_floats(text: str) -> tuple[float, float]:
    try:
        first, second = (_real(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers like 0.9,0.999, got {text!r}"
        ) from None
    return first, second


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(_integer(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 3,7, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not any(names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    if "" in names:  # a slip (two commas, one too many): not a list with a gap to ignore
        raise argparse.ArgumentTypeError(f"has an empty item in the list {text!r}")
    return names


def _text(text: str) -> str:
    # An empty value typed on purpose means nothing here: no field reads '' as a setting (an
    # empty --ray-address would quietly start the embedded Ray instance).
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a value, got {text!r}")
    return text


_VALUE_TYPES = {
    "int": _integer,
    "float": _real,
    "str": _text,
    "tuple[float, float]": _pair_of_floats,
    "tuple[int, ...]": _ints,
    "tuple[str, ...]": _names,
}
"""A field's annotation (without ``| None``) -> how its flag's text becomes a value."""


def _argument(command: str, path: str, item: dataclasses.Field) -> tuple[str, dict[str, Any]]:
    """The flag and ``add_argument`` options of config field ``path``."""
    override = _MANUAL_ROLE_FLAGS.get(command, {}).get(path, {})
    default = override.get("default", item.default)
    text = override.get("help", field_docs()[path]).replace("%", "%%")
    options: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS}
    annotation = str(item.type).removesuffix(" | None")
    if annotation == "bool":
        # A flag switches the default off (--no-eval) or on (--sync); it takes no value.
        options["action"] = "store_false" if item.default else "store_true"
        if item.default:
            text += " This flag turns it off."
    else:
        options["type"] = _VALUE_TYPES[annotation]
        name = _flag(command, path)[2:].upper().replace("-", "_")
        options["metavar"] = "N" if annotation == "int" else "S" if path.endswith("_s") else name
        if "choices" in item.metadata:
            options["choices"] = item.metadata["choices"]
            del options["metavar"]
        if "default" in override:
            options["default"] = default
        if override.get("required"):
            options["required"] = True
        elif default not in (None, "", ()) and default is not dataclasses.MISSING:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default: {shown})"
    options["help"] = text
    return _flag(command, path), options


def _grouped_fields(command: str) -> Iterator[tuple[str, list[tuple[str, dataclasses.Field]]]]:
    paths = set(_command_paths(command))
    job = JobConfig()
    for section in dataclasses.fields(job):
        items = [
            (f"{section.name}.{item.name}", item)
            for item in dataclasses.fields(getattr(job, section.name))
            if f"{section.name}.{item.name}" in paths
        ]
        if items:
            yield section.name, items


def add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """One argument group per config section, one flag per field ``command`` takes."""
    for section, items in _grouped_fields(command):
        group = parser.add_argument_group(section, field_docs()[section])
        exclusive: dict[str, Any] = {}
        for path, item in items:
            pair = next((pair for pair in _EXCLUSIVE if path in pair), None)
            if pair is not None and pair not in exclusive:
                exclusive[pair] = group.add_mutually_exclusive_group()
            container = exclusive[pair] if pair is not None else group
            flag, options = _argument(command, path, item)
            if path in _SWITCHED_BACK_ON:
                container = group.add_mutually_exclusive_group()
                on_flag, on_help = _SWITCHED_BACK_ON[path]
                container.add_argument(
                    on_flag,
                    dest=path,
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help=on_help,
                )
            container.add_argument(flag, **options)


def _add_security_flags(parser: argparse.ArgumentParser, *, server: bool) -> None:
    group = parser.add_argument_group("security")
    group.add_argument(
        "--auth-key-file", type=_text, help="the job's key (make one: distbelief keygen FILE)"
    )
    if server:
        group.add_argument(
            "--no-auth", action="store_true", help="accept any peer (only on a network you trust)"
        )
        group.add_argument("--tls-cert", type=_text, help="PEM certificate: speak TLS")
        group.add_argument("--tls-key", type=_text, help="PEM private key of --tls-cert")
    else:
        group.add_argument(
            "--tls-ca", type=_text, help="PEM CA bundle: speak TLS, verify shards with it"
        )


def security_from_args(args: argparse.Namespace) -> WireSecurity:
    """The wire security of a manual role; a shard needs a key file or an explicit --no-auth."""
    # Imported here: the wire package loads torch, which the parser must not wait for.
    from distbelief.wire.security import WireSecurity, read_key_file

    key_file = getattr(args, "auth_key_file", None)
    if getattr(args, "no_auth", False) and key_file:
        raise ValueError("give --auth-key-file or --no-auth, not both")
    if args.command == "ps" and not key_file and not args.no_auth:
        raise ValueError(
            "give --auth-key-file FILE (create it with: distbelief keygen FILE) or --no-auth"
        )
    tls_cert, tls_key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    for flag, path in (
        ("--tls-cert", tls_cert),
        ("--tls-key", tls_key),
        ("--tls-ca", getattr(args, "tls_ca", None)),
    ):
        if not path:
            continue
        try:
            if Path(path).is_dir():
                raise ValueError(f"{flag} {path}: is a folder, not a PEM file")
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        except OSError as e:  # a name too long for the file system, say
            raise ValueError(f"{flag} {path}: {e.strerror or e}") from None
    try:
        auth_key = read_key_file(key_file) if key_file else None
    except ValueError as e:
        raise ValueError(f"--auth-key-file: {e}") from None
    security = WireSecurity(
        auth_key=auth_key,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=getattr(args, "tls_ca", None),
    )
    _check_tls_files(security)
    return security


def _check_tls_files(security: WireSecurity) -> None:
    """Load the TLS files now: one that is not PEM of its kind is bad input, named here, not
    a traceback from the first connection."""
    import ssl

    try:
        security.server_tls()
    except (ssl.SSLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        cert, key = security.tls_cert, security.tls_key
        try:  # which of the two it is: a certificate file loads as a CA bundle
            ssl.create_default_context(cafile=cert)
        except (ssl.SSLError, OSError):
            raise ValueError(f"--tls-cert {cert}: not a PEM certificate ({reason})") from None
        if reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"--tls-key {key}: not the private key of --tls-cert {cert}") from None
        raise ValueError(f"--tls-key {key}: not a PEM private key ({reason})") from None
    try:
        security.client_tls()
    except (ssl.SSLError, OSError) as e:
        raise ValueError(
            f"--tls-ca {security.tls_ca}: not a PEM CA bundle ({getattr(e, 'reason', None) or e})"
        ) from None


_ADDRESSES_HELP = (
    "shard addresses tcp://HOST:PORT (or shm://HOST:PORT: shared memory on this host), "
    "comma-separated, in shard-id order"
)


def _add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="run a job: its shards, workers and evaluator (here, or with --cluster ray)"
    )
    train.add_argument(
        "--resume",
        type=_text,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its checkpoints, with its config (of the other flags, "
        "only those that change no result: --max-iterations, --timeout, --eval-every, ...)",
    )
    add_config_flags(train, "train")


def _add_ps_parser(commands) -> None:
    ps = commands.add_parser("ps", help="serve one parameter-server shard")
    ps.add_argument(
        "--shard-id", type=_integer, required=True, help="this shard's id, in [0, --num-shards)"
    )
    ps.add_argument(
        "--bind",
        default="tcp://127.0.0.1:7000",
        help=(
            "address to listen on, tcp://HOST:PORT or shm://HOST:PORT (default: "
            "tcp://127.0.0.1:7000); another host than 127.0.0.1 exposes the shard"
        ),
    )
    ps.add_argument(
        "--checkpoint-dir", type=_text, help="restore from and save checkpoints to this folder"
    )
    add_config_flags(ps, "ps")
    _add_security_flags(ps, server=True)


def _add_worker_parser(commands) -> None:
    worker = commands.add_parser("worker", help="train one replica against running shards")
    worker.add_argument("--ps", required=True, help=_ADDRESSES_HELP)
    worker.add_argument(
        "--rank", type=_integer, required=True, help="this worker's rank, in [0, --num-workers)"
    )
    stages = worker.add_argument_group("model parallelism (one stage of a replica)")
    stages.add_argument(
        "--stage", type=_integer, help="the partition this process runs, in [0, --partitions)"
    )
    stages.add_argument(
        "--bind", help="stages after the first: address to listen on for the previous stage"
    )
    stages.add_argument("--next", help="stages before the last: the next stage's address")
    add_config_flags(worker, "worker")
    _add_security_flags(worker, server=False)


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate running shards' parameters on the test set"
    )
    evaluate.add_argument("--ps", required=True, help=_ADDRESSES_HELP)
    evaluate.add_argument(
        "--once", action="store_true", help="evaluate once, print the result and exit"
    )
    add_config_flags(evaluate, "eval")
    _add_security_flags(evaluate, server=False)


def _add_plot_parser(commands) -> None:
    plot = commands.add_parser("plot", help="plot one run folder, or compare several")
    plot.add_argument("run_dirs", nargs="+", type=_text, metavar="RUN_DIR", help="run folder(s)")
    plot.add_argument(
        "--out", dest="out_dir", type=_text, help="where the PNGs go (default: the first run)"
    )


def _add_reshard_parser(commands) -> None:
    reshard = commands.add_parser(
        "reshard",
        help="rewrite a stopped run's checkpoints for another number of shards",
        description="Rewrite RUN_DIR's checkpoints (dense parameters, optimizer state, row "
        "tables) for --shards N shards and record N in its config.json; resume it with "
        "distbelief train --resume RUN_DIR.",
    )
    reshard.add_argument(
        "run_dir", type=_text, metavar="RUN_DIR", help="the run folder (its run stopped)"
    )
    add_config_flags(reshard, "reshard")


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="debug logging and full tracebacks",
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="distbelief", description="Downpour SGD against a sharded parameter server."
    )
    _add_verbose(parser, False)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(commands)
    _add_ps_parser(commands)
    _add_worker_parser(commands)
    _add_eval_parser(commands)
    _add_plot_parser(commands)
    _add_reshard_parser(commands)
    keygen = commands.add_parser("keygen", help="write a new job key file (owner-only)")
    keygen.add_argument("path", type=_text)
    for command in commands.choices.values():
        # Also after the command (`distbelief train -v`), leaving one given before it be.
        _add_verbose(command, argparse.SUPPRESS)
    return parser


def subcommand_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (for its usage line in errors found after parsing)."""
    return subcommands(get_args_parser())[command]
