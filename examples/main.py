"""The 2018 pytorch-distbelief example, on the current library: AlexNet on CIFAR-10 with
DownpourSGD, one parameter server and two training nodes, each started by hand.

    python examples/main.py --rank 0 --world-size 3 --server   # make server
    python examples/main.py --rank 1 --world-size 3            # make first
    python examples/main.py --rank 2 --world-size 3            # make second
    python examples/main.py --no-distributed                   # plain torch.optim.SGD

Rank 0 is the parameter server; ranks 1..world_size-1 train on disjoint slices of the data.
Each node writes <out>/node<rank>/metrics.csv and accuracy-vs-time plots, like the seed's.
Only holders of the job key may push or pull: the server creates <out>/job.key (owner-only) if
it is missing, and the nodes read it (on several machines, copy it there privately).
Offline, add ``--dataset digits --model lenet`` (scikit-learn's bundled digits).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from torch import nn

from distbelief.data import DATASET_NAMES, iterate_batches, load_dataset, worker_indices
from distbelief.evaluator import evaluate
from distbelief.models import MODEL_NAMES, build_model
from distbelief.optim import DownpourSGD
from distbelief.plots import plot_run
from distbelief.server import server_optimizer_factory
from distbelief.server.process import serve_shard
from distbelief.telemetry import MetricsWriter, make_record
from distbelief.wire.security import WireSecurity, read_key_file, write_key_file


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Downpour SGD, the seed's example")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.03, help="worker and server rate")
    parser.add_argument("--num-pull", type=int, default=5, help="n_pull of DownpourSGD")
    parser.add_argument("--num-push", type=int, default=5, help="n_push of DownpourSGD")
    parser.add_argument("--log-interval", type=int, default=20, help="steps between log lines")
    parser.add_argument("--no-distributed", action="store_true", help="train alone with SGD")
    parser.add_argument("--rank", type=int, default=0, help="0 is the parameter server")
    parser.add_argument("--world-size", type=int, default=3, help="server + training nodes")
    parser.add_argument("--server", action="store_true", help="run the parameter server")
    parser.add_argument("--master", default="127.0.0.1", help="the parameter server's host")
    parser.add_argument("--port", type=int, default=29500, help="the parameter server's port")
    parser.add_argument("--model", choices=MODEL_NAMES, default="alexnet")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="cifar10")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--auth-key-file", default=None, help="default: <out>/job.key")
    return parser


def _key_file(args: argparse.Namespace) -> Path:
    return Path(args.auth_key_file or Path(args.out) / "job.key")


def run_server(args: argparse.Namespace) -> None:
    key_file = _key_file(args)
    if not key_file.exists():
        write_key_file(key_file)
    serve_shard(
        0,
        1,
        f"tcp://{args.master}:{args.port}",
        optimizer_factory=server_optimizer_factory("sgd", lr=args.lr),
        security=WireSecurity(auth_key=read_key_file(key_file)),
        emit=lambda kind, payload: print(f"{kind}: {payload}", flush=True),
    )


def run_node(args: argparse.Namespace) -> None:
    num_workers = 1 if args.no_distributed else args.world_size - 1
    worker_rank = 0 if args.no_distributed else args.rank - 1
    train_set = load_dataset(args.dataset, split="train", data_dir=args.data_dir)
    test_set = load_dataset(args.dataset, split="test", data_dir=args.data_dir)
    torch.manual_seed(0)
    net = build_model(args.model, train_set.input_shape, train_set.num_classes)
    if args.no_distributed:
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
    else:
        optimizer = DownpourSGD(
            net.parameters(),
            lr=args.lr,
            n_push=args.num_push,
            n_pull=args.num_pull,
            model=net,
            ps=f"tcp://{args.master}:{args.port}",
            auth_key=read_key_file(_key_file(args)),
        )
    indices = worker_indices(len(train_set), worker_rank, num_workers)
    run_dir = Path(args.out) / f"node{args.rank}"
    start, step = time.time(), 0
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
    if isinstance(optimizer, DownpourSGD):
        optimizer.close()
    plot_run(run_dir)


def main() -> None:
    args = get_args_parser().parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.server:
        run_server(args)
    elif not args.no_distributed and not 1 <= args.rank < args.world_size:
        raise SystemExit(f"--rank {args.rank}: training nodes are 1..{args.world_size - 1}")
    else:
        run_node(args)


if __name__ == "__main__":
    main()
