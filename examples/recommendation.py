"""A click model with its embedding tables on parameter-server shards, in your own loop.

A DLRM (dense features through a bottom MLP, one embedding bag per categorical feature, their
pairwise dot products, a top MLP) trains on the synthetic click log: its 26 tables' rows live on
the shards (``ShardedEmbeddings``), its dense layers train with ``DownpourSGD``. The worker
never allocates a table: they are built on the meta device. Start the shards first:

    distbelief ps --shard-id 0 --num-shards 2 --bind tcp://127.0.0.1:7000 --no-auth \\
        --server-lr 0.5 --row-optimizer adagrad --row-lr 0.01 &
    distbelief ps --shard-id 1 --num-shards 2 --bind tcp://127.0.0.1:7001 --no-auth \\
        --server-lr 0.5 --row-optimizer adagrad --row-lr 0.01 &
    python examples/recommendation.py --ps tcp://127.0.0.1:7000,tcp://127.0.0.1:7001

It prints the training loss every ``--log-interval`` steps and, at the end, the test AUC of the
shards' parameters against the ceiling (the hidden model that drew the clicks): 0.69 against
0.84 with these commands. The shards train the dense layers at their ``--server-lr`` (at the
default 0.05 the test AUC ends at 0.59). Ctrl-C (or SIGTERM) stops it with
``recommendation.py: interrupted`` (exit 130), once it has loaded torch (its first second or
so; before, it ends as any Python program does: SIGTERM's 143, Ctrl-C's traceback).
"""

from __future__ import annotations

import argparse
import itertools
import math
import signal
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from distbelief import (
    DistBeliefError,
    DownpourSGD,
    NotAPeerError,
    ShardedEmbeddings,
    ShardListError,
    TableSizeMismatchError,
    check_ps_addresses,
)
from distbelief.data import ground_truth_logits, iterate_ctr_batches, load_dataset
from distbelief.models import DLRM
from distbelief.telemetry import roc_auc

TRAIN_SAMPLES = 100_000
"""The synthetic click log's training split."""
MAX_TABLE_SIZE = 2**31
"""The most ids a table of the synthetic click log may have."""
MAX_RATE = float(torch.finfo(torch.float32).max)
"""A rate multiplies float32 tensors: a larger one cannot be converted to their type."""
MAX_CACHE_MB = float(2**30)
"""The largest row cache ``ShardedEmbeddings`` takes."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DLRM with embedding tables on the shards", allow_abbrev=False
    )
    parser.add_argument("--ps", required=True, help="shard addresses, comma-separated, in order")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--lr", type=float, default=0.05, help="the local step's rate (the shards': --server-lr)"
    )
    # 1000 ids per table: each id comes back often enough in the 100k training samples to learn
    # (0.69 test AUC; 0.66 with the data set's default 10000).
    parser.add_argument("--table-size", type=int, default=1000, help="ids per table")
    parser.add_argument("--row-cache-mb", type=float, default=0.0)
    parser.add_argument("--log-interval", type=int, default=50)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse does not check itself, refused as it refuses the rest (exit 2)."""
    for flag, value in (
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--log-interval", args.log_interval),
    ):
        if value < 1:
            parser.error(f"argument {flag}: must be >= 1, got {value}")
    if args.batch_size > TRAIN_SAMPLES:
        parser.error(
            f"argument --batch-size: must be <= the {TRAIN_SAMPLES} training samples, "
            f"got {args.batch_size}"
        )
    if not 2 <= args.table_size <= MAX_TABLE_SIZE:
        parser.error(
            f"argument --table-size: must be in [2, {MAX_TABLE_SIZE}], got {args.table_size}"
        )
    for flag, value, most in (
        ("--lr", args.lr, MAX_RATE),
        ("--row-cache-mb", args.row_cache_mb, MAX_CACHE_MB),
    ):
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"argument {flag}: must be a finite number >= 0, got {value:g}")
        if value > most:
            # A whole bound in full, as train says it (2**30, not 1.07374e+09).
            bound = int(most) if most.is_integer() and most < 1e15 else f"{most:g}"
            parser.error(f"argument {flag}: must be <= {bound}, got {value:g}")
    try:
        check_ps_addresses(args.ps)  # as distbelief worker checks --ps; connects nothing
    except ValueError as e:
        parser.error(f"argument --ps: {e}")


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> float:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops it as Ctrl-C does
    # A shell starts a command in the background with SIGINT ignored, and Python then leaves it
    # ignored: a SIGINT sent by pid must still stop it, as Ctrl-C does.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return train_and_evaluate(args)
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    except (ShardListError, NotAPeerError) as e:  # --ps in another order, or not a shard's
        parser.exit(2, f"{parser.prog}: error: argument --ps: {e}\n")
    except TableSizeMismatchError as e:  # the shards hold tables of another --table-size
        parser.exit(2, f"{parser.prog}: error: argument --table-size: {e}\n")
    except DistBeliefError as e:  # the shards could not be reached, say
        parser.exit(1, f"{parser.prog}: {type(e).__name__}: {e}\n")


def training_batches(train, args: argparse.Namespace) -> Iterator:
    """``args.steps`` batches of the training split, epoch after epoch: one epoch of the
    default 100_000 samples is 390 batches of 256, fewer than the default 400 steps."""
    indices = torch.arange(len(train))
    epochs = (
        iterate_ctr_batches(train, indices, args.batch_size, seed=0, epoch=epoch)
        for epoch in itertools.count()
    )
    return itertools.islice(itertools.chain.from_iterable(epochs), args.steps)


def train_and_evaluate(args: argparse.Namespace) -> float:
    """Train on the shards at ``args.ps``; the test AUC of their parameters."""
    train = load_dataset("synthetic-ctr", split="train", table_size=args.table_size)
    test = load_dataset("synthetic-ctr", split="test", table_size=args.table_size)
    torch.manual_seed(0)
    model = DLRM(train.num_dense, train.table_sizes, embedding_device="meta")
    # Closed however training ends: on Ctrl-C at once, pushing nothing more.
    with (
        ShardedEmbeddings(model, ps=args.ps, row_cache_mb=args.row_cache_mb) as tables,
        DownpourSGD(model.parameters(), lr=args.lr, model=model, ps=args.ps) as optimizer,
    ):
        columns = {name: int(name.rpartition(".")[2]) for name in tables.modules}
        for step, (dense, sparse, labels) in enumerate(training_batches(train, args), start=1):
            tables.prefetch({name: sparse[:, column] for name, column in columns.items()})
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(dense, sparse), labels)
            loss.backward()
            optimizer.step()
            tables.step()
            if step % args.log_interval == 0:
                print(f"step {step}: loss {loss.item():.4f}", flush=True)
    # The test split on the shards' parameters, read with a fresh client of the same tables
    # (its dense client trains nothing: closing it only closes its connections).
    torch.manual_seed(0)
    reader_model = DLRM(test.num_dense, test.table_sizes, embedding_device="meta")
    with (
        ShardedEmbeddings(reader_model, ps=args.ps) as reader,
        DownpourSGD(reader_model.parameters(), model=reader_model, ps=args.ps),
        torch.no_grad(),
    ):
        reader.prefetch({name: test.sparse[:, column] for name, column in columns.items()})
        scores = reader_model(test.dense, test.sparse)
    auc = roc_auc(scores, test.labels)
    ceiling = roc_auc(ground_truth_logits(test), test.labels)
    print(f"test AUC {auc:.4f} (the hidden model's: {ceiling:.4f})")
    return auc


if __name__ == "__main__":
    main()
