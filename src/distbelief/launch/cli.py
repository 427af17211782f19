"""The ``distbelief`` command: argparse -> config -> run. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from distbelief.client import parse_addresses
from distbelief.data import DATASET_NAMES
from distbelief.errors import ChildFailedError, DistBeliefError
from distbelief.launch.config import TrainConfig
from distbelief.models import MODEL_NAMES
from distbelief.server import SERVER_OPTIMIZER_NAMES, STALENESS_POLICIES

logger = logging.getLogger("distbelief")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
        default=2.0,
        help="seconds between evaluations of the shards' parameters",
    )
    train.add_argument(
        "--warmstart-steps",
        type=int,
        default=0,
        help="worker 0 trains alone for its first N pushes",
    )
    _add_training_flags(train)
    _add_server_flags(train)

    ps = commands.add_parser("ps", help="serve one parameter-server shard")
    ps.add_argument("--shard-id", type=int, required=True)
    ps.add_argument("--num-shards", type=int, required=True)
    ps.add_argument("--num-workers", type=int, default=1, help="workers expected in a --sync round")
    ps.add_argument(
        "--bind",
        default="tcp://127.0.0.1:7000",
        help="address to listen on; another host than 127.0.0.1 exposes the shard",
    )
    _add_server_flags(ps)

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
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


_NOT_CONFIG = {"command", "verbose", "ps", "rank", "shard_id", "bind"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``train`` and ``worker``; ValueError names a bad flag value."""
    fields = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    return TrainConfig(**fields)


def _run_train(args: argparse.Namespace) -> int:
    from distbelief.launch.local import train

    result = train(config_from_args(args))
    final = result.final
    print(
        f"done in {result.elapsed_s:.1f}s: test accuracy {final.get('test_accuracy', 0):.4f} "
        f"(parameter server, version {final.get('version')}); run folder {result.run_dir}"
    )
    return 0


def _log_emit(kind: str, payload: object) -> None:
    if kind == "ready":
        # One parseable stdout line, so scripts and tests learn the port when binding to :0.
        print(f"serving shard {payload['shard_id']} at {payload['address']}", flush=True)
    logger.info("%s %s", kind, payload)


def _run_ps(args: argparse.Namespace) -> int:
    from distbelief.launch.roles import serve_shard

    if not 0 <= args.shard_id < args.num_shards:
        raise ValueError(
            f"--shard-id {args.shard_id} is not in [0, --num-shards {args.num_shards})"
        )
    config = config_from_args(args)
    serve_shard(
        args.shard_id,
        args.num_shards,
        args.bind,
        optimizer_factory=config.server_optimizer_factory(),
        consistency=config.consistency(),
        emit=_log_emit,
    )
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from distbelief.launch.roles import run_worker

    if not 0 <= args.rank < args.num_workers:
        raise ValueError(f"--rank {args.rank} is not in [0, --num-workers {args.num_workers})")
    config = config_from_args(args)
    result = run_worker(
        config, args.rank, parse_addresses(args.ps), emit=_log_emit, start_time=time.time()
    )
    print(f"worker {args.rank} done after {result['steps']} steps")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen command; returns the process exit code."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    commands = {"train": _run_train, "ps": _run_ps, "worker": _run_worker}
    try:
        return commands[args.command](args)
    except ValueError as e:
        print(f"distbelief {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ChildFailedError as e:
        print(f"distbelief {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"distbelief {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DistBeliefError as e:
        if type(e).__name__ == "LauncherInterrupted":
            print(f"distbelief {args.command}: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"distbelief {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))
