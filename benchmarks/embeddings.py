"""Embedding-table benchmark: a DLRM's tables on a shard against the same tables in one process.

Five measurements, each a ratio against a baseline timed or counted in the same run:

- ``throughput``: steps/s of 1 worker + 1 shard (the shard in its own process, serving the
  dense parameters and the tables; the worker prefetches every table's rows in one request and
  pushes their gradients in another) over one process training the same DLRM with
  ``nn.EmbeddingBag(sparse=True)`` and ``torch.optim.SGD`` on the same batches (the tables fit
  in one process). Interleaved repeats, median of per-repeat ratios. Target >= 0.7 at batch
  512, 26 tables.
- ``bytes``: the wire bytes of one step (rows pulled and gradient rows pushed, ids included)
  against the dense alternative (every table pulled and pushed whole).
- ``rows``: rows per second one shard serves, pulling and pushing 4096 unique ids per request
  from a table holding 200k rows, row dim 32 and 128, against a dense pull of a [4096, D]
  tensor from a shard (the same payload on the wire, without the row lookup).
- ``memory``: a worker process's peak RSS while training against a table 10x its
  ``--row-cache-mb`` (rows on the shard), against the same process before its first step.
- ``tables``: a click model's step of rows over two shards, each in its own process: a pull
  and a push of 26 tables of 88 distinct ids each (width 16), against a pull and a push of the
  same 2,288 ids in one table: the same rows and bytes; what the ratio lacks of 1 is the cost
  of a table, on the client and on the shards. Median of interleaved repeats.

Usage: ``PYTHONPATH=src:benchmarks python benchmarks/embeddings.py [--only NAME] [--out STEM]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from queue import Empty

import torch
import torch.nn.functional as F

import machine
from distbelief.client import ParameterServerClient
from distbelief.client.rows import RowClient
from distbelief.data.synthetic_ctr import make_synthetic_ctr
from distbelief.embeddings import ShardedEmbeddings
from distbelief.models.dlrm import DLRM
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server.row_tables import RowTableSettings, ShardTables
from distbelief.sharding import TensorSpec
from distbelief.wire import serve
from server_host import ServerHost

LR = 0.05
NUM_TABLES = 26
TABLE_SIZE = 10_000
DIM = 16
NUM_BATCHES = 8


def start_table_shard_of(shard_id: int, num_shards: int, lr: float):
    """Shard ``shard_id`` of ``num_shards``: SGD tables (and dense parameters), one thread."""
    torch.set_num_threads(1)
    shard = ParameterShard(shard_id, num_shards, server_optimizer_factory("sgd", lr=lr))
    tables = ShardTables(shard_id, num_shards, RowTableSettings(optimizer="sgd", lr=lr))
    return serve("tcp://127.0.0.1:0", ShardService(shard, tables=tables))


def start_table_shard(lr: float):
    """A shard of a one-shard job with plain-SGD dense parameters and SGD tables, computing
    on one thread as a job's shard does by default (``--server-threads``)."""
    torch.set_num_threads(1)
    shard = ParameterShard(0, 1, server_optimizer_factory("sgd", lr=lr))
    tables = ShardTables(0, 1, RowTableSettings(optimizer="sgd", lr=lr))
    return serve("tcp://127.0.0.1:0", ShardService(shard, tables=tables))


def _batches(batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    data = make_synthetic_ctr("train", batch_size * NUM_BATCHES, table_size=TABLE_SIZE)
    return [
        (
            data.dense[i : i + batch_size],
            data.sparse[i : i + batch_size],
            data.labels[i : i + batch_size],
        )
        for i in range(0, len(data), batch_size)
    ]


class _Local:
    """The baseline: the whole DLRM in this process, sparse gradients, torch.optim.SGD."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = DLRM(13, (TABLE_SIZE,) * NUM_TABLES, embedding_dim=DIM)
        for table in self.model.tables:
            table.sparse = True
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)

    def step(self, batch) -> None:
        dense, sparse, labels = batch
        self.optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(self.model(dense, sparse), labels).backward()
        self.optimizer.step()

    def close(self) -> None:
        pass


class _Sharded:
    """The same DLRM, its tables' rows and its dense parameters on one shard."""

    def __init__(self, address: str, row_cache_mb: float = 0.0, n_pull: int = 1) -> None:
        torch.manual_seed(0)
        self.model = DLRM(
            13, (TABLE_SIZE,) * NUM_TABLES, embedding_dim=DIM, embedding_device="meta"
        )
        self.tables = ShardedEmbeddings(
            self.model, ps=[address], lr=LR, n_pull=n_pull, row_cache_mb=row_cache_mb
        )
        self.optimizer = DownpourSGD(self.model.parameters(), lr=LR, model=self.model, ps=[address])
        self.columns = {name: int(name.rpartition(".")[2]) for name in self.tables.modules}

    def step(self, batch, following=None) -> None:
        dense, sparse, labels = batch
        if not self.tables.has_rows_for_step():
            self.tables.prefetch({name: sparse[:, c] for name, c in self.columns.items()})
        if following is not None:
            self.tables.prefetch_next({n: following[1][:, c] for n, c in self.columns.items()})
        self.optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(self.model(dense, sparse), labels).backward()
        self.optimizer.step()
        self.tables.step()

    def close(self) -> None:
        self.optimizer.close()
        self.tables.close()


def _steps_per_s(trainer, batches, num_steps: int) -> float:
    for batch in batches[:2]:  # warm: first allocations, first rows created
        trainer.step(batch)
    started = time.perf_counter()
    for step in range(num_steps):
        following = batches[(step + 1) % len(batches)] if step + 1 < num_steps else None
        if isinstance(trainer, _Sharded):
            trainer.step(batches[step % len(batches)], following)
        else:
            trainer.step(batches[step % len(batches)])
    if isinstance(trainer, _Sharded):
        trainer.optimizer.flush()
        trainer.tables.flush()
    return num_steps / (time.perf_counter() - started)


def measure_throughput(args) -> dict:
    batches = _batches(args.batch_size)
    with ServerHost(start_table_shard, LR, name="table-shard") as host:
        sharded = _Sharded(host.start_server())
        local = _Local()
        samples = {"local": [], "sharded": []}
        try:
            for repeat in range(args.repeats):
                order = ("local", "sharded") if repeat % 2 == 0 else ("sharded", "local")
                for name in order:
                    trainer = local if name == "local" else sharded
                    samples[name].append(_steps_per_s(trainer, batches, args.steps))
            wire = sharded.tables.client.take_wire_figures()
        finally:
            sharded.close()
    ratios = [s / b for s, b in zip(samples["sharded"], samples["local"], strict=True)]
    return {
        "batch_size": args.batch_size,
        "tables": NUM_TABLES,
        "steps_per_s_local": samples["local"],
        "steps_per_s_sharded": samples["sharded"],
        "ratio_median": statistics.median(ratios),
        "wire_bytes_last": wire,
    }


def measure_bytes(args) -> dict:
    """Bytes of one step's row traffic against pulling and pushing every table whole."""
    batches = _batches(args.batch_size)
    with ServerHost(start_table_shard, LR, name="table-shard") as host:
        sharded = _Sharded(host.start_server())
        try:
            sharded.step(batches[0])
            sharded.tables.flush()
            sharded.tables.client.take_wire_figures()
            steps = 0
            for batch in batches[1:]:
                sharded.step(batch)
                steps += 1
            sharded.tables.flush()
            wire = sharded.tables.client.take_wire_figures()
        finally:
            sharded.close()
    per_step = (wire["bytes_pushed"] + wire["bytes_pulled"]) / steps
    whole = 2 * NUM_TABLES * TABLE_SIZE * DIM * 4
    unique = [
        sum(int(torch.unique(sparse[:, t]).numel()) for t in range(NUM_TABLES))
        for _, sparse, _ in batches[1:]
    ]
    expected = statistics.mean(unique) * (2 * 8 + 2 * DIM * 4)
    return {
        "batch_size": args.batch_size,
        "bytes_per_step": per_step,
        "expected_bytes_per_step": expected,
        "dense_alternative_bytes_per_step": whole,
        "ratio_to_dense": per_step / whole,
    }


def measure_rows_per_s(args) -> dict:
    results = {}
    with ServerHost(start_table_shard, LR, name="table-shard") as host:
        for dim in (32, 128):
            address = host.start_server()
            client = RowClient([address], {"t": dim}, timeout_s=120)
            try:
                client.handshake()
                ids = torch.randperm(200_000)
                for chunk in ids.split(50_000):
                    client.push_now({"t": (chunk, torch.zeros(chunk.numel(), dim))})
                requests = [ids[i : i + 4096] for i in range(0, 200_000 - 4096, 4096)]
                grads = torch.randn(4096, dim)
                started = time.perf_counter()
                for request in requests[: args.requests]:
                    client.pull({"t": request})
                pull_s = time.perf_counter() - started
                started = time.perf_counter()
                for request in requests[: args.requests]:
                    client.push_now({"t": (request, grads)})
                push_s = time.perf_counter() - started
            finally:
                client.close()
            rows = 4096 * min(args.requests, len(requests))
            dense_s = _dense_pull_s(host.start_server(), dim, min(args.requests, len(requests)))
            results[f"dim{dim}"] = {
                "pull_rows_per_s": rows / pull_s,
                "push_rows_per_s": rows / push_s,
                "dense_rows_per_s": rows / dense_s,
                "pull_over_dense": dense_s / pull_s,
                "push_over_dense": dense_s / push_s,
            }
    return results


TABLES_IDS_PER_TABLE = 88


def _requests_s(client: RowClient, requests: list[dict], repeats: int) -> float:
    """Median seconds of one pull and one push of each request's ids, over ``repeats``."""
    grads = {
        name: torch.ones(ids.numel(), DIM) for name, ids in requests[0].items()
    }  # every request has the same number of ids per table
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for request in requests:
            client.pull(request)
            client.push_now({name: (ids, grads[name]) for name, ids in request.items()})
        times.append((time.perf_counter() - started) / len(requests))
    return statistics.median(times)


def measure_tables(args) -> dict:
    generator = torch.Generator().manual_seed(0)
    num_ids = NUM_TABLES * TABLES_IDS_PER_TABLE
    # Each request's ids distinct (as a worker's, summed before a push), in no order.
    requests = [
        torch.randperm(TABLE_SIZE * NUM_TABLES, generator=generator)[:num_ids]
        for _ in range(args.requests)
    ]
    many = [
        {f"t{t}": ids for t, ids in enumerate(request.split(TABLES_IDS_PER_TABLE))}
        for request in requests
    ]
    one = [{"all": request} for request in requests]
    widths = {**{f"t{t}": DIM for t in range(NUM_TABLES)}, "all": DIM}
    with contextlib.ExitStack() as stack:
        addresses = [
            stack.enter_context(
                ServerHost(start_table_shard_of, shard_id, 2, LR, name=f"shard-{shard_id}")
            ).start_server()
            for shard_id in range(2)
        ]
        client = stack.enter_context(contextlib.closing(RowClient(addresses, widths)))
        client.handshake()
        for requests in (many, one):  # every row made before anything is timed
            _requests_s(client, requests, 1)
        many_s, one_s = [], []
        for repeat in range(args.repeats):
            pair = [(many, many_s), (one, one_s)]
            for requests, times in pair if repeat % 2 == 0 else reversed(pair):
                times.append(_requests_s(client, requests, 1))
    return {
        "tables": NUM_TABLES,
        "ids_per_request": num_ids,
        "many_tables_ms": [t * 1e3 for t in many_s],
        "one_table_ms": [t * 1e3 for t in one_s],
        "ratio_median": statistics.median(o / m for o, m in zip(one_s, many_s, strict=True)),
    }


def _dense_pull_s(address: str, dim: int, num_requests: int) -> float:
    """Seconds to pull a dense [4096, dim] tensor ``num_requests`` times: the wire's cost of a
    row pull's payload without the row lookup."""
    spec = [TensorSpec("rows", (4096, dim), torch.float32)]
    client = ParameterServerClient([address], spec, timeout_s=120)
    try:
        flats = {torch.float32: torch.zeros(4096 * dim)}
        client.handshake(flats)
        started = time.perf_counter()
        for _ in range(num_requests):
            client.pull_now(flats)
        return time.perf_counter() - started
    finally:
        client.close()


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (the peak). Not
    getrusage's maxrss: Linux keeps that across exec, so a spawned child starts with its
    parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_worker(address: str, table_rows: int, cache_mb: float, steps: int, queue) -> None:
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(table_rows, 32, mode="sum", device="meta"))
    tables = ShardedEmbeddings(model, ps=[address], n_pull=4, row_cache_mb=cache_mb, lr=LR)
    generator = torch.Generator().manual_seed(1)
    before = _status_bytes("VmRSS")
    for _ in range(steps):
        ids = (torch.rand(512, 8, generator=generator) ** 3 * table_rows).long()
        tables.prefetch({"0": ids})
        model(ids).sum().backward()
        tables.step()
    tables.close()
    after = _status_bytes("VmHWM")
    cache_bytes = sum(cache.nbytes for cache in tables.caches.values())
    queue.put({"rss_before": before, "rss_peak": after, "cache_bytes": cache_bytes})


def measure_memory(args) -> dict:
    table_bytes = args.table_rows * 32 * 4
    cache_mb = table_bytes / 10 / (1 << 20)
    with ServerHost(start_table_shard, LR, name="table-shard") as host:
        address = host.start_server()
        filler = RowClient([address], {"0": 32}, timeout_s=300)
        try:
            filler.handshake()
            for chunk in torch.arange(args.table_rows).split(200_000):
                filler.push_now({"0": (chunk, torch.zeros(chunk.numel(), 32))})
        finally:
            filler.close()
        context = mp.get_context("spawn")
        queue = context.Queue()
        worker = context.Process(
            target=_memory_worker,
            args=(address, args.table_rows, cache_mb, args.memory_steps, queue),
        )
        worker.start()
        deadline = time.monotonic() + 900
        while True:
            try:
                figures = queue.get(timeout=1)
                break
            except Empty:
                if not worker.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the memory worker failed (its traceback is above)"
                    ) from None
        worker.join(60)
    growth = figures["rss_peak"] - figures["rss_before"]
    return {
        "table_rows": args.table_rows,
        "table_bytes": table_bytes,
        "row_cache_mb": cache_mb,
        **figures,
        "rss_growth": growth,
        "growth_over_cache_budget": growth / (cache_mb * (1 << 20)),
        "growth_over_table": growth / table_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--only", choices=("throughput", "bytes", "rows", "memory", "tables"))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=30, help="requests per rows/s timing")
    parser.add_argument("--table-rows", type=int, default=2_000_000)
    parser.add_argument("--memory-steps", type=int, default=200)
    parser.add_argument(
        "--out",
        type=machine.out_path,
        default=None,
        help="results stem (default: results/embeddings_cpuN_DATE; '-': do not write)",
    )
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeats", "requests", "table_rows", "memory_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(1)
    measurements = {
        "throughput": measure_throughput,
        "bytes": measure_bytes,
        "rows": measure_rows_per_s,
        "memory": measure_memory,
        "tables": measure_tables,
    }
    record: dict = {}
    for name, measure in measurements.items():
        if args.only in (None, name):
            record[name] = measure(args)
            print(name, record[name], flush=True)
    record.update(machine.environment())
    day = f"{datetime.date.today():%Y%m%d}"
    stem = args.out or Path(__file__).parent / "results" / f"embeddings_cpu{os.cpu_count()}_{day}"
    cells = _cells(record)
    print(
        machine.write_report(
            stem,
            record,
            "Embedding tables on a shard",
            __doc__.split("\n\n", 1)[1],
            ["measure", "value"],
            cells,
        )
    )
    return 0


def _cells(record: dict) -> list[list[str]]:
    cells = []
    if "throughput" in record:
        t = record["throughput"]
        cells.append(
            ["steps/s 1 worker + 1 shard / one process (median ratio)", f"{t['ratio_median']:.2f}"]
        )
        cells.append(
            ["steps/s one process (median)", f"{statistics.median(t['steps_per_s_local']):.1f}"]
        )
        cells.append(
            ["steps/s sharded (median)", f"{statistics.median(t['steps_per_s_sharded']):.1f}"]
        )
    if "bytes" in record:
        b = record["bytes"]
        cells.append(
            ["row bytes per step / whole tables pulled and pushed", f"{b['ratio_to_dense']:.4f}"]
        )
        cells.append(
            [
                "row bytes per step / (unique ids x (2x8 + 2xDx4))",
                f"{b['bytes_per_step'] / b['expected_bytes_per_step']:.3f}",
            ]
        )
    if "rows" in record:
        for dim, figures in record["rows"].items():
            cells.append(
                [f"rows/s one shard serves, {dim}, pull", f"{figures['pull_rows_per_s']:.0f}"]
            )
            cells.append(
                [f"rows/s one shard serves, {dim}, push", f"{figures['push_rows_per_s']:.0f}"]
            )
            for kind in ("pull", "push"):
                cells.append(
                    [
                        f"row {kind} / dense pull of the same bytes, {dim}",
                        f"{figures[f'{kind}_over_dense']:.2f}",
                    ]
                )
    if "memory" in record:
        m = record["memory"]
        cells.append(
            ["worker RSS growth / row cache budget", f"{m['growth_over_cache_budget']:.2f}"]
        )
        cells.append(["worker RSS growth / table bytes", f"{m['growth_over_table']:.3f}"])
    if "tables" in record:
        t = record["tables"]
        cells.append(
            [
                f"pull+push ms, {t['tables']} tables of {t['ids_per_request']} ids, 2 shards",
                f"{statistics.median(t['many_tables_ms']):.2f}",
            ]
        )
        cells.append(
            [
                "pull+push ms, the same ids in one table",
                f"{statistics.median(t['one_table_ms']):.2f}",
            ]
        )
        cells.append(["one table / 26 tables (median ratio)", f"{t['ratio_median']:.2f}"])
    return cells


if __name__ == "__main__":
    sys.exit(machine.run_main(main))
