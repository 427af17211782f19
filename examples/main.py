"""The 2018 pytorch-distbelief example on the seed's API: AlexNet on CIFAR-10 with DownpourSGD,
one parameter server and two training nodes in a torch.distributed (gloo) job, each started by
hand. Every process finishes by itself once both nodes have trained.

    python examples/main.py --rank 0 --world-size 3 --server   # make server
    python examples/main.py --rank 1 --world-size 3            # make first
    python examples/main.py --rank 2 --world-size 3            # make second
    python examples/main.py --no-distributed                   # plain torch.optim.SGD

Every process joins the process group at --master:--port (rank 0's host). Rank 0 runs
``ParameterServer(model).run()``, which publishes its address and a fresh job key in the group's
store; ranks 1..world_size-1 train on disjoint slices of the data with
``DownpourSGD(net.parameters(), lr=..., n_push=..., n_pull=..., model=net)``, no address given.
Each node writes <out>/node<rank>/metrics.csv and accuracy-vs-time plots, like the seed's.
Offline, add ``--dataset digits --model lenet`` (scikit-learn's bundled digits).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

# torch's C++ side logs every failed attempt to reach rank 0's store, stack trace included (40
# lines and more), before the error this script turns into one line. Read once, when torch loads;
# a value the user set is kept.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

import torch
import torch.distributed as dist
from torch import nn

from distbelief import DatasetUnavailableError, DistBeliefError, ModelMismatchError
from distbelief.data import ArrayDataset, iterate_batches, load_dataset, worker_indices
from distbelief.launch import draw_plots, run_dir_locked
from distbelief.models import build_model
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterServer
from distbelief.telemetry import MetricsWriter, make_record

EVAL_BATCH_SIZE = 1000
IMAGE_MODELS = ("lenet", "alexnet", "mlp", "wide-mlp", "wide-cnn")
IMAGE_DATASETS = ("digits", "cifar10", "mnist", "synthetic")
"""What this example trains: image classifiers (a click model needs the embedding tables of
``examples/recommendation.py``)."""
MAX_RATE = float(torch.finfo(torch.float32).max)
"""A rate multiplies float32 tensors: a larger one cannot be converted to their type."""
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
"""One dot-separated part of a host name."""
MAX_THREADS = 1024
"""Far past any machine's cores: torch's thread pool crashes the process at about 100000."""
MAX_JOIN_TIMEOUT_S = 7 * 24 * 3600.0
"""A week: torch's store overflows its clock on waits of some centuries."""
MAX_WORLD_SIZE = 2**31 - 1
MAX_COUNT = 2**31 - 1
"""The most steps a count flag (``--num-push``, ``--epochs``, ...) takes, as DownpourSGD's."""
"""torch.distributed holds ranks in 32-bit ints."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Downpour SGD, the seed's example", allow_abbrev=False
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.03, help="the nodes' rate (the server's too)")
    parser.add_argument("--num-pull", type=int, default=5, help="n_pull of DownpourSGD")
    parser.add_argument("--num-push", type=int, default=5, help="n_push of DownpourSGD")
    parser.add_argument("--log-interval", type=int, default=20, help="steps between log lines")
    alone_or_server = parser.add_mutually_exclusive_group()
    alone_or_server.add_argument(
        "--no-distributed", action="store_true", help="train alone with SGD"
    )
    parser.add_argument(
        "--rank", type=int, default=None, help="0 (the default) is the parameter server"
    )
    parser.add_argument("--world-size", type=int, default=3, help="server + training nodes")
    alone_or_server.add_argument("--server", action="store_true", help="run the parameter server")
    parser.add_argument("--master", default="127.0.0.1", help="rank 0's host (process group)")
    parser.add_argument("--port", type=int, default=29500, help="the process group's port")
    parser.add_argument(
        "--join-timeout", type=float, default=600.0, help="seconds to wait for the other ranks"
    )
    parser.add_argument(
        "--retry-timeout",
        type=float,
        default=60.0,
        help="seconds a node retries an unreachable server before it gives up",
    )
    parser.add_argument("--model", choices=IMAGE_MODELS, default="alexnet")
    parser.add_argument("--dataset", choices=IMAGE_DATASETS, default="cifar10")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this rank (the ranks of one host share its cores)",
    )
    parser.add_argument("--out", default="runs/example")
    return parser


class Data(NamedTuple):
    """What a rank trains and tests on: a node's training set and its slice of it (the
    server's: None), and the test set."""

    train_set: ArrayDataset | None
    test_set: ArrayDataset
    indices: torch.Tensor | None


def evaluate(net: nn.Module, dataset: ArrayDataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` on all of ``dataset``."""
    net.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), EVAL_BATCH_SIZE):
            images = dataset.images[start : start + EVAL_BATCH_SIZE]
            labels = dataset.labels[start : start + EVAL_BATCH_SIZE]
            logits = net(images)
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == labels).sum())
    net.train()
    return total_loss / len(dataset), correct / len(dataset)


def build_net(args: argparse.Namespace, dataset: ArrayDataset) -> nn.Module:
    torch.manual_seed(0)
    return build_model(args.model, dataset.input_shape, dataset.num_classes)


def _load_split(parser: argparse.ArgumentParser, args: argparse.Namespace, split: str):
    """One split of the data set; a corrupt or cut-off file (the loader names it) is bad
    input, said in one line (exit 2), as ``distbelief worker`` says it."""
    try:
        return load_dataset(args.dataset, split=split, data_dir=args.data_dir)
    except DatasetUnavailableError:
        raise  # files to fetch: said by main()
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: argument --data-dir: {e}\n")


def load_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Data:
    """This rank's data sets (the server's: the test set alone), loaded before it joins the
    others: files that cannot be had, or a node's batch larger than its share of the training
    set (it would run no step), end this rank at once instead of leaving the others waiting.

    Raises:
        DatasetUnavailableError: the data set's files are missing and cannot be downloaded.
    """
    test_set = _load_split(parser, args, "test")
    if args.server and not args.no_distributed:
        return Data(None, test_set, None)
    train_set = _load_split(parser, args, "train")
    num_workers = 1 if args.no_distributed else args.world_size - 1
    worker_rank = 0 if args.no_distributed else args.rank - 1
    indices = worker_indices(len(train_set), worker_rank, num_workers)
    if args.batch_size > len(indices):  # a pass drops its last, partial batch
        parser.error(
            f"argument --batch-size: must be <= the {len(indices)} training examples of this "
            f"node (its share of {len(train_set)} among {num_workers}), got {args.batch_size}"
        )
    return Data(train_set, test_set, indices)


def run_server(args: argparse.Namespace, test_set: ArrayDataset) -> None:
    net = build_net(args, test_set)
    # Returns once every node has finished, or is lost (killed, say).
    summary = ParameterServer(net, join_timeout_s=args.join_timeout).run()
    if not summary["finished"] and not summary["lost_ranks"]:
        raise KeyboardInterrupt  # stopped before the nodes were done
    _, test_accuracy = evaluate(net, test_set)
    print(
        f"server: {summary['version']} updates applied, test accuracy {test_accuracy:.4f}",
        flush=True,
    )
    if summary["lost_ranks"]:
        raise SystemExit(f"server: ranks {summary['lost_ranks']} left before they finished")


def run_node(args: argparse.Namespace, data: Data) -> None:
    train_set, test_set, indices = data
    net = build_net(args, train_set)
    if args.no_distributed:
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
    else:
        optimizer = DownpourSGD(
            net.parameters(),
            lr=args.lr,
            n_push=args.num_push,
            n_pull=args.num_pull,
            model=net,
            retry_timeout_s=args.retry_timeout,
        )
    run_dir = Path(args.out) / f"node{args.rank}"
    # The with block closes DownpourSGD however training ends: at its end it pushes what is left
    # and tells the server this node is done; on Ctrl-C it tells the server at once, pushing
    # nothing more (a flush would retry a server that is gone for --retry-timeout first).
    closing = optimizer if isinstance(optimizer, DownpourSGD) else contextlib.nullcontext()
    try:
        with closing:
            try:
                train_node(args, net, optimizer, (train_set, test_set, indices), run_dir)
            except DistBeliefError:
                # Closed now, not by the with block's flush: requests still queued stop
                # retrying, and none logs a retry after the error line (a gone server's close
                # sends nothing, and returns at once).
                with contextlib.suppress(DistBeliefError):
                    optimizer.close()
                raise
    except (KeyboardInterrupt, DistBeliefError):
        draw_plots(run_dir)  # what it trained so far, as train does for a stopped or failed job
        raise
    # As train does: a plot that cannot be drawn is a warning (with the command that draws it
    # later), not the end of a node that trained.
    draw_plots(run_dir, job_done=True)


def node_config(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """The fields of ``distbelief train``'s config.json that describe this node's run: the
    plots read the batch size from it (samples/s; without it they assumed train's default),
    their titles and the labels of ``distbelief plot RUN_A RUN_B`` the rest. The node tests
    its own replica, not the server's parameters: its plots label that curve as the worker's."""
    config: dict[str, dict[str, object]] = {
        "model": {"name": args.model},
        "data": {"name": args.dataset},
        "optimizer": {"algorithm": "downpour", "batch_size": args.batch_size, "lr": args.lr},
        "reporting": {"tested_model": "worker"},
    }
    if args.no_distributed:
        config["cluster"] = {"num_workers": 1, "num_shards": 0}
        return config
    config["cluster"] = {"num_workers": args.world_size - 1, "num_shards": 1}
    config["optimizer"] |= {"n_push": args.num_push, "n_pull": args.num_pull}
    # Given no rate, ParameterServer applies plain SGD at each pushing node's rate.
    config["server"] = {"optimizer": "sgd", "lr": args.lr}
    return config


def train_node(args, net, optimizer, data, run_dir: Path) -> None:
    """The node's epochs: train, log every --log-interval steps, test after each epoch."""
    train_set, test_set, indices = data
    worker_rank = 0 if args.no_distributed else args.rank - 1
    start, step = time.time(), 0
    # Written to a temporary name, then renamed: a reader never sees half of it.
    partial = run_dir / ".config.json.tmp"
    partial.write_text(json.dumps(node_config(args), indent=1))
    os.replace(partial, run_dir / "config.json")
    with MetricsWriter(run_dir / "metrics.csv") as writer:
        for epoch in range(args.epochs):
            for images, labels in iterate_batches(
                train_set, indices, args.batch_size, seed=0, epoch=epoch
            ):
                optimizer.zero_grad()
                logits = net(images)
                loss = nn.functional.cross_entropy(logits, labels)
                loss.backward()
                optimizer.step()
                step += 1
                if step % args.log_interval == 0:
                    accuracy = float((logits.argmax(1) == labels).float().mean())
                    writer.write(
                        make_record(
                            "worker",
                            worker_rank,
                            time_s=time.time() - start,
                            step=step,
                            loss=loss.item(),
                            accuracy=accuracy,
                        )
                    )
                if args.max_steps is not None and step >= args.max_steps:
                    break
            test_loss, test_accuracy = evaluate(net, test_set)
            writer.write(
                make_record(
                    "evaluator",
                    worker_rank,
                    time_s=time.time() - start,
                    step=step,
                    test_loss=test_loss,
                    test_accuracy=test_accuracy,
                )
            )
            print(f"node {args.rank} epoch {epoch}: test accuracy {test_accuracy:.4f}", flush=True)
            if args.max_steps is not None and step >= args.max_steps:
                break


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse does not check itself, refused as it refuses the rest (exit 2)."""
    counts = {
        "--batch-size": args.batch_size,
        "--epochs": args.epochs,
        "--num-pull": args.num_pull,
        "--num-push": args.num_push,
        "--log-interval": args.log_interval,
        "--max-steps": args.max_steps,
        "--threads": args.threads,
    }
    for flag, value in counts.items():
        if value is not None and value < 1:
            parser.error(f"argument {flag}: must be >= 1, got {value}")
        if value is not None and value > MAX_COUNT:  # DownpourSGD's bound: refused before joining
            parser.error(f"argument {flag}: must be <= {MAX_COUNT}, got {value}")
    if args.threads > MAX_THREADS:
        parser.error(f"argument --threads: must be <= {MAX_THREADS}, got {args.threads}")
    amounts = {
        "--lr": (args.lr, True, MAX_RATE),  # a rate multiplies float32 tensors
        "--join-timeout": (args.join_timeout, False, math.inf),
        "--retry-timeout": (args.retry_timeout, True, MAX_JOIN_TIMEOUT_S),  # DownpourSGD's too
    }
    for flag, (value, zero_ok, most) in amounts.items():
        if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            sign = ">=" if zero_ok else ">"
            parser.error(f"argument {flag}: must be a finite number {sign} 0, got {value}")
        if value > most:
            parser.error(f"argument {flag}: must be <= {most:g}, got {value}")
    for flag, value in (("--out", args.out), ("--data-dir", args.data_dir)):
        if not value:
            parser.error(f"argument {flag}: expected a value, got ''")
    if args.join_timeout > MAX_JOIN_TIMEOUT_S:
        parser.error(
            f"argument --join-timeout: must be <= {MAX_JOIN_TIMEOUT_S:g} (a week), "
            f"got {args.join_timeout:g}"
        )
    if args.no_distributed:
        # A rank is a place in a process group: alone, a node given another than 0 would still
        # write node0/ and record worker 0 (its data are all of the training set), not what it
        # said. --rank 0, the seed's default spelled out, is what a lone node is.
        if args.rank not in (None, 0):
            parser.error(
                f"argument --rank: a lone node (--no-distributed) is rank 0, got {args.rank}"
            )
        args.rank = 0
        return
    if args.rank is None:
        args.rank = 0
    check_master(parser, args.master)
    if not 1 <= args.port <= 65535:
        parser.error(f"argument --port: must be in [1, 65535], got {args.port}")
    # Rank 0 is the parameter server (--server), ranks 1.. are training nodes.
    if args.world_size < 2:
        parser.error(f"argument --world-size: need the server and >= 1 node, got {args.world_size}")
    if args.world_size > MAX_WORLD_SIZE:
        parser.error(f"argument --world-size: must be <= {MAX_WORLD_SIZE}, got {args.world_size}")
    if not 0 <= args.rank < args.world_size:
        parser.error(f"argument --rank: {args.rank} is not in [0, --world-size {args.world_size})")
    if args.server != (args.rank == 0):
        parser.error("rank 0 is the parameter server: run it, and only it, with --server")


def check_master(parser: argparse.ArgumentParser, host: str) -> None:
    """--master: an IP address, or a host name (no port, no scheme) that a lookup knows; a
    lookup that fails for now (a name server away) passes: joining retries it."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return
    labels = host.removesuffix(".").split(".")
    if labels[-1].isdigit() or not all(HOST_LABEL.fullmatch(label) for label in labels):
        parser.error(
            f"argument --master: must be an IP address or host name (no port), got {host!r}"
        )
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            parser.error(f"argument --master: host {host!r} is not known here ({e.strerror})")


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def master_address(args: argparse.Namespace) -> str:
    """--master:--port, an IPv6 address in brackets."""
    host = f"[{args.master}]" if ":" in args.master else args.master
    return f"{host}:{args.port}"


_UNFINISHED_JOINS: list[threading.Thread] = []
"""The thread of a ``join_process_group`` that has not joined (waiting still, or failed)."""


def _exit_interrupted(parser: argparse.ArgumentParser) -> None:
    """Exit 130 with one line (a second Ctrl-C or SIGTERM changes nothing from here). A rank
    interrupted before it joined the process group leaves at once, its ``finally`` blocks
    run: torch's rendezvous may have left a thread of its own in C++ (waiting still, or its
    store's, the server gone), which the interpreter's exit destroyed running (``terminate
    called without an active exception``, exit 134)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    message = f"{parser.prog}: interrupted\n"
    if not _UNFINISHED_JOINS:
        parser.exit(130, message)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.write(message)
    sys.stderr.flush()
    os._exit(130)


def join_process_group(args: argparse.Namespace) -> None:
    """``dist.init_process_group`` on a thread of its own: torch waits for the other ranks in
    C++, where the main thread would see Ctrl-C or SIGTERM only once --join-timeout ran out."""
    errors: list[BaseException] = []

    def join() -> None:
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{master_address(args)}",
                rank=args.rank,
                world_size=args.world_size,
                timeout=datetime.timedelta(seconds=args.join_timeout),
            )
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    thread = threading.Thread(target=join, name="join-process-group", daemon=True)
    _UNFINISHED_JOINS.append(thread)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.1)  # wakes for signals, which only the main thread handles
    if errors:
        raise errors[0]
    _UNFINISHED_JOINS.remove(thread)


def make_run_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Path]:
    """A node's <out>/node<rank>, made before it joins the others: a folder that cannot be made
    (a file in the way, a read-only place) is refused as a bad flag (exit 2). Returns the
    folders it made, deepest first, for ``remove_if_empty``."""
    if args.server and not args.no_distributed:
        return []  # the server writes nothing
    run_dir = Path(args.out) / f"node{args.rank}"
    try:
        made = [path for path in (run_dir, *run_dir.parents) if not path.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only place, a name too long
        existing = _nearest_existing(run_dir)
        if existing is not None and not existing.is_dir():
            where = "exists" if existing == run_dir else f"cannot be created: {existing} exists"
            parser.error(f"--out {run_dir}: {where} and is not a folder")
        parser.error(f"--out {run_dir}: cannot create the folder: {e.strerror}")
    return made


def _nearest_existing(path: Path) -> Path | None:
    """``path`` or its nearest ancestor that exists; None where the file system refuses to
    say (a name too long for it)."""
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError:
            continue
    return None


def hold_run_dir(
    parser: argparse.ArgumentParser, args: argparse.Namespace, stack: contextlib.ExitStack
) -> None:
    """Holds the node's <out>/node<rank> until ``stack`` closes, as train holds its run folder:
    a second node of this rank into this --out (``make first`` run twice) is refused before it
    joins, not let write its metrics and plots over this node's."""
    if args.server and not args.no_distributed:
        return
    run_dir = Path(args.out) / f"node{args.rank}"
    try:
        stack.enter_context(run_dir_locked(run_dir, f"--out {run_dir}"))
    except ValueError as e:
        parser.error(str(e))


def remove_if_empty(folders: list[Path]) -> None:
    """Removes the folders ``make_run_dir`` made, deepest first, while they are empty: a node
    that ended before it wrote anything (it could not join, say) leaves no empty node<rank>/."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # it holds files (or another node's folder): kept, and those above it
            return


def run_rank(parser: argparse.ArgumentParser, args: argparse.Namespace, data: Data) -> None:
    """Trains alone, or joins the process group and runs this rank's part."""
    if args.no_distributed:
        run_node(args, data)
        return
    print(
        f"rank {args.rank}: joining the process group at {master_address(args)} "
        f"(all {args.world_size} ranks; waiting up to {args.join_timeout:g}s)",
        flush=True,
    )
    try:
        join_process_group(args)
    except (RuntimeError, ValueError) as e:  # torch's store timeout, an unknown host
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        parser.exit(1, f"{parser.prog}: cannot join the process group: {first_line}\n")
    try:
        if args.server:
            run_server(args, data.test_set)
        else:
            run_node(args, data)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    _UNFINISHED_JOINS.clear()
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO)
    # One thread per rank by default: torch's default (one per core) in each of three ranks on
    # one host made the example's LeNet run on digits take 5x the CPU, its threads waiting on
    # each other's cores.
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends a rank as Ctrl-C does
    # A shell starts a command in the background with SIGINT ignored, and Python then leaves it
    # ignored: a SIGINT sent to this rank by its pid must still stop it, as Ctrl-C does.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        data = load_data(parser, args)
        made = make_run_dir(parser, args)  # after the data's checks: a refused rank writes nothing
        try:
            with contextlib.ExitStack() as held:
                hold_run_dir(parser, args, held)
                run_rank(parser, args, data)
        finally:
            remove_if_empty(made)
    except KeyboardInterrupt:
        _exit_interrupted(parser)
    except DatasetUnavailableError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")  # files to fetch: bad input
    except ModelMismatchError as e:  # the server's rank builds another model: bad input
        parser.exit(
            2, f"{parser.prog}: error: {e} (give every rank the same --model and --dataset)\n"
        )
    except DistBeliefError as e:
        parser.exit(1, f"{parser.prog}: {type(e).__name__}: {e}\n")


if __name__ == "__main__":
    try:
        main()
    finally:
        # The exit code is known: a signal in the interpreter's exit (unloading torch takes a
        # while) ended the rank by it (exit 143), where nothing was left to stop.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
