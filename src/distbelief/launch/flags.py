"""The ``distbelief`` command's flags: one argparse parser per subcommand, and the wire
security a manual role's flags describe. Parsing only: nothing here runs anything."""

from __future__ import annotations

import argparse
from pathlib import Path

from distbelief.data import DATASET_NAMES
from distbelief.launch.config import TrainConfig
from distbelief.models import MODEL_NAMES
from distbelief.server import SERVER_OPTIMIZER_NAMES, STALENESS_POLICIES
from distbelief.wire.security import WireSecurity, read_key_file


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--model", choices=MODEL_NAMES, default=defaults.model)
    parser.add_argument("--dataset", choices=DATASET_NAMES, default=defaults.dataset)
    parser.add_argument(
        "--data-dir",
        default=defaults.data_dir,
        help="folder of CIFAR-10 / MNIST files (downloaded when missing)",
    )
    parser.add_argument(
        "--n-push", type=int, default=defaults.n_push, help="push accrued gradients every N steps"
    )
    parser.add_argument(
        "--n-pull", type=int, default=defaults.n_pull, help="fetch fresh parameters every N steps"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="worker learning rate")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="steps per worker")
    length.add_argument(
        "--epochs",
        type=int,
        help=f"passes over each worker's slice (default {defaults.num_epochs})",
    )
    parser.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="fail instead of downloading missing data set files",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        default=defaults.timeout_s,
        help="seconds before a request to a shard fails",
    )
    parser.add_argument(
        "--retry-timeout",
        dest="retry_timeout_s",
        type=float,
        default=defaults.retry_timeout_s,
        help="seconds to keep retrying an unreachable shard (e.g. restarting) before failing",
    )
    parser.add_argument(
        "--blocking",
        action="store_true",
        help="workers wait for every push and pull (reproducible, slower)",
    )
    parser.add_argument(
        "--threads",
        dest="threads_per_worker",
        type=int,
        default=defaults.threads_per_worker,
        help="torch threads per worker",
    )


def _betas(text: str) -> tuple[float, float]:
    try:
        beta1, beta2 = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers like 0.9,0.999, got {text!r}"
        ) from None
    return beta1, beta2


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    group = parser.add_argument_group("server optimizer")
    group.add_argument(
        "--server-optimizer", choices=SERVER_OPTIMIZER_NAMES, default=defaults.server_optimizer
    )
    group.add_argument(
        "--server-lr",
        type=float,
        default=defaults.server_lr,
        help="the shards' learning rate (gamma for adagrad)",
    )
    group.add_argument("--server-momentum", type=float, default=defaults.server_momentum)
    group.add_argument(
        "--server-betas", type=_betas, default=defaults.server_betas, help="adam's beta1,beta2"
    )
    group.add_argument("--server-eps", type=float, default=None, help="adagrad/adam epsilon")
    consistency = parser.add_argument_group("consistency")
    consistency.add_argument(
        "--sync", action="store_true", help="synchronous rounds: one averaged update per step"
    )
    consistency.add_argument(
        "--backup-workers",
        type=int,
        default=0,
        help="with --sync: apply each round after N - b gradients",
    )
    consistency.add_argument(
        "--max-staleness",
        type=int,
        default=None,
        help="stale synchronous parallel: max steps ahead of the slowest",
    )
    consistency.add_argument(
        "--staleness-policy", choices=STALENESS_POLICIES, default=defaults.staleness_policy
    )
    consistency.add_argument("--dc-lambda", type=float, default=defaults.dc_lambda)
    consistency.add_argument(
        "--liveness-timeout",
        dest="liveness_timeout_s",
        type=float,
        default=defaults.liveness_timeout_s,
        help="seconds of silence after which a worker counts as dead",
    )


def _add_eval_parser(commands) -> None:
    defaults = TrainConfig()
    evaluate = commands.add_parser(
        "eval", help="evaluate running shards' parameters on the test set"
    )
    evaluate.add_argument("--ps", required=True, help="shard addresses, comma-separated, in order")
    evaluate.add_argument("--model", choices=MODEL_NAMES, default=defaults.model)
    evaluate.add_argument("--dataset", choices=DATASET_NAMES, default=defaults.dataset)
    evaluate.add_argument("--data-dir", default=defaults.data_dir)
    evaluate.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="fail instead of downloading missing data set files",
    )
    evaluate.add_argument("--seed", type=int, default=defaults.seed)
    evaluate.add_argument("--timeout", dest="timeout_s", type=float, default=defaults.timeout_s)
    evaluate.add_argument(
        "--retry-timeout", dest="retry_timeout_s", type=float, default=defaults.retry_timeout_s
    )
    evaluate.add_argument(
        "--eval-every",
        dest="eval_every_s",
        type=float,
        default=defaults.eval_every_s,
        help="seconds between evaluations",
    )
    evaluate.add_argument(
        "--out", dest="out_dir", default="", help="append each evaluation to OUT/metrics.csv"
    )
    evaluate.add_argument(
        "--once", action="store_true", help="evaluate once, print the result and exit"
    )
    _add_security_flags(evaluate, server=False)


def _add_plot_parser(commands) -> None:
    plot = commands.add_parser("plot", help="plot one run folder, or compare several")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s)")
    plot.add_argument(
        "--out", dest="out_dir", default="", help="where the PNGs go (default: the first run)"
    )


def _add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-every",
        dest="checkpoint_every_s",
        type=float,
        default=TrainConfig().checkpoint_every_s,
        help="seconds between shard checkpoints (also saved at shutdown)",
    )


def _add_security_flags(parser: argparse.ArgumentParser, *, server: bool) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--auth-key-file", help="the job's key (make one: distbelief keygen FILE)")
    if server:
        group.add_argument(
            "--no-auth", action="store_true", help="accept any peer (only on a network you trust)"
        )
        group.add_argument("--tls-cert", help="PEM certificate: speak TLS")
        group.add_argument("--tls-key", help="PEM private key of --tls-cert")
    else:
        group.add_argument("--tls-ca", help="PEM CA bundle: speak TLS, verify shards with it")


def security_from_args(args: argparse.Namespace) -> WireSecurity:
    """The wire security of a manual role; a shard needs a key file or an explicit --no-auth."""
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
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    return WireSecurity(
        auth_key=read_key_file(key_file) if key_file else None,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=getattr(args, "tls_ca", None),
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distbelief", description="Downpour SGD against a sharded parameter server."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run shards, workers and an evaluator locally")
    train.add_argument("--workers", dest="num_workers", type=int, default=2)
    train.add_argument("--shards", dest="num_shards", type=int, default=2)
    train.add_argument("--out", dest="out_dir", default="", help="run folder (default runs/TIME)")
    train.add_argument(
        "--eval-every",
        dest="eval_every_s",
        type=float,
        default=TrainConfig().eval_every_s,
        help="seconds between evaluations of the shards' parameters",
    )
    train.add_argument(
        "--no-eval",
        dest="eval_during_training",
        action="store_false",
        help="no evaluations while training; the test accuracy is measured once at the end",
    )
    train.add_argument(
        "--warmstart-steps",
        type=int,
        default=0,
        help="worker 0 trains alone for its first N pushes",
    )
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its shard checkpoints, with its config",
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=TrainConfig().max_restarts,
        help="restarts allowed per process that dies",
    )
    _add_training_flags(train)
    _add_server_flags(train)
    _add_checkpoint_flags(train)

    ps = commands.add_parser("ps", help="serve one parameter-server shard")
    ps.add_argument("--shard-id", type=int, required=True)
    ps.add_argument("--num-shards", type=int, required=True)
    ps.add_argument("--num-workers", type=int, default=1, help="workers expected in a --sync round")
    ps.add_argument(
        "--bind",
        default="tcp://127.0.0.1:7000",
        help="address to listen on; another host than 127.0.0.1 exposes the shard",
    )
    ps.add_argument("--checkpoint-dir", help="restore from and save checkpoints to this folder")
    _add_server_flags(ps)
    _add_checkpoint_flags(ps)
    _add_security_flags(ps, server=True)

    worker = commands.add_parser("worker", help="train one replica against running shards")
    worker.add_argument("--ps", required=True, help="shard addresses, comma-separated, in order")
    worker.add_argument("--rank", type=int, required=True)
    worker.add_argument("--num-workers", type=int, required=True)
    worker.add_argument(
        "--warmstart-steps",
        type=int,
        default=0,
        help="ranks > 0 wait until the shards have applied N updates",
    )
    _add_training_flags(worker)
    _add_security_flags(worker, server=False)
    _add_eval_parser(commands)
    _add_plot_parser(commands)
    keygen = commands.add_parser("keygen", help="write a new job key file (owner-only)")
    keygen.add_argument("path")
    return parser
