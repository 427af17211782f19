"""Pins the command line: a flag added, renamed or dropped must show up here on purpose."""

import argparse

from distbelief.launch.flags import get_args_parser

TRAINING = {
    "--batch-size",
    "--blocking",
    "--data-dir",
    "--dataset",
    "--epochs",
    "--lr",
    "--model",
    "--n-pull",
    "--n-push",
    "--no-download",
    "--retry-timeout",
    "--seed",
    "--steps",
    "--threads",
    "--timeout",
}
SERVER = {
    "--backup-workers",
    "--dc-lambda",
    "--liveness-timeout",
    "--max-staleness",
    "--server-betas",
    "--server-eps",
    "--server-lr",
    "--server-momentum",
    "--server-optimizer",
    "--staleness-policy",
    "--sync",
    "--checkpoint-every",
}
EXPECTED = {
    "train": TRAINING
    | SERVER
    | {
        "--eval-every",
        "--max-restarts",
        "--no-eval",
        "--out",
        "--resume",
        "--shards",
        "--warmstart-steps",
        "--workers",
    },
    "ps": SERVER
    | {
        "--auth-key-file",
        "--bind",
        "--checkpoint-dir",
        "--no-auth",
        "--num-shards",
        "--num-workers",
        "--shard-id",
        "--tls-cert",
        "--tls-key",
    },
    "worker": TRAINING
    | {
        "--auth-key-file",
        "--num-workers",
        "--ps",
        "--rank",
        "--tls-ca",
        "--warmstart-steps",
    },
    "eval": {
        "--auth-key-file",
        "--data-dir",
        "--dataset",
        "--eval-every",
        "--model",
        "--no-download",
        "--once",
        "--out",
        "--ps",
        "--retry-timeout",
        "--seed",
        "--timeout",
        "--tls-ca",
    },
    "plot": {"--out"},
    "keygen": set(),
}


def test_no_unplanned_flags():
    subparsers = next(
        action
        for action in get_args_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    actual = {
        name: {
            flag
            for action in parser._actions
            for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"
        }
        for name, parser in subparsers.choices.items()
    }
    assert actual == EXPECTED
