"""The ``distbelief`` command: parsed flags -> config -> run. Nothing else lives here.

Exit codes: 0 done, 1 a process failed, 2 bad flags or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from distbelief.client import parse_addresses
from distbelief.errors import ChildFailedError, DistBeliefError, LauncherInterrupted
from distbelief.launch.config import TrainConfig
from distbelief.launch.flags import get_args_parser, security_from_args
from distbelief.wire.security import write_key_file

logger = logging.getLogger("distbelief")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


_NOT_CONFIG = {
    "command",
    "verbose",
    "ps",
    "rank",
    "shard_id",
    "bind",
    "resume",
    "checkpoint_dir",
    "auth_key_file",
    "no_auth",
    "tls_cert",
    "tls_key",
    "tls_ca",
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``train`` and ``worker``; ValueError names a bad flag value."""
    fields = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    return TrainConfig(**fields)


def _run_train(args: argparse.Namespace) -> int:
    from distbelief.launch.train import train

    if args.resume:
        config = TrainConfig.from_file(Path(args.resume) / "config.json")
        result = train(config.replace(out_dir=args.resume), resume=True)
    else:
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
    logger.log(logging.DEBUG if kind == "heartbeat" else logging.INFO, "%s %s", kind, payload)


def _run_ps(args: argparse.Namespace) -> int:
    from distbelief.server.process import serve_shard

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
        security=security_from_args(args),
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_s=config.checkpoint_every_s,
        emit=_log_emit,
    )
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from distbelief.worker import run_worker

    if not 0 <= args.rank < args.num_workers:
        raise ValueError(f"--rank {args.rank} is not in [0, --num-workers {args.num_workers})")
    config = config_from_args(args)
    result = run_worker(
        config,
        args.rank,
        parse_addresses(args.ps),
        emit=_log_emit,
        start_time=time.time(),
        security=security_from_args(args),
    )
    print(f"worker {args.rank} done after {result['steps']} steps")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from distbelief.evaluator import format_result, watch_shards

    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        seed=args.seed,
        timeout_s=args.timeout_s,
        retry_timeout_s=args.retry_timeout_s,
        eval_every_s=args.eval_every_s,
    )
    addresses = parse_addresses(args.ps)
    result = watch_shards(
        config,
        addresses,
        out_dir=args.out_dir,
        once=args.once,
        security=security_from_args(args),
    )
    print(format_result(result))
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from distbelief.plots import plot_run, plot_runs

    out_dir = args.out_dir or args.run_dirs[0]
    if len(args.run_dirs) == 1:
        written = plot_run(args.run_dirs[0], out_dir=out_dir)
    else:
        written = plot_runs(args.run_dirs, out_dir=out_dir)
    print("\n".join(str(path) for path in written))
    return 0


def _run_keygen(args: argparse.Namespace) -> int:
    path = write_key_file(args.path)
    print(f"wrote {path} (readable by you only); pass it with --auth-key-file {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen command; returns the process exit code."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    commands = {
        "train": _run_train,
        "ps": _run_ps,
        "worker": _run_worker,
        "eval": _run_eval,
        "plot": _run_plot,
        "keygen": _run_keygen,
    }
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
    except LauncherInterrupted as e:
        print(f"distbelief {args.command}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DistBeliefError as e:
        print(f"distbelief {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))
