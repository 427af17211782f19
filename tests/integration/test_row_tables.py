"""Embedding tables on real shard processes: one worker's rows, pushed blocking, equal a single
process ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag`` trained by torch.optim on the same
batches; only the touched rows travel; a shard refuses what it does not own; a restarted click
worker pushes each step's rows once."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distbelief.client.rows import RowClient
from distbelief.config import JobConfig
from distbelief.data import load_job_dataset
from distbelief.embeddings import ShardedEmbeddings
from distbelief.errors import (
    ConsistencyMismatchError,
    ModelMismatchError,
    RemoteError,
    ShardListError,
)
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.server.row_optimizers import LazyAdam
from distbelief.server.row_table import RowTable, seeded_normal_rows
from distbelief.server.row_tables import RowTableSettings, ShardTables
from distbelief.wire import serve
from distbelief.worker import run_worker
from distbelief.worker.ctr import build_ctr_replica, job_tables
from tests.conftest import (
    StopAt,
    check_ctrl_c_ends_promptly_with_the_shard_gone,
    private_loopback,
    start_shard,
    stop_processes,
)

DIM = 4
NUM_ROWS = {"words": 40, "bags": 25}
INIT_STD = 0.5
STEPS = 6


class _Model(nn.Module):
    """An embedding and an embedding bag read through a fixed projection (no dense
    parameters: the rows are what is compared)."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(NUM_ROWS["words"], DIM, sparse=True)
        self.bags = nn.EmbeddingBag(NUM_ROWS["bags"], DIM, mode="sum", sparse=True)
        self.register_buffer("projection", torch.linspace(-1.0, 1.0, 2 * DIM))

    def forward(self, words: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.words(words).sum(dim=1), self.bags(bags)], dim=1)
        return features @ self.projection


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(STEPS):
        # Few distinct ids per batch, so repeats (summed on the worker) are common.
        words = torch.randint(0, 12, (8, 3), generator=generator)
        bags = torch.randint(0, NUM_ROWS["bags"], (8, 2), generator=generator)
        batches.append((words, bags, torch.randn(8, generator=generator)))
    return batches


def _loss(model: nn.Module, batch) -> torch.Tensor:
    words, bags, target = batch
    return ((model(words, bags) - target) ** 2).mean()


def _reference(optimizer_name: str, lr: float) -> dict[str, torch.Tensor]:
    model = _Model()
    with torch.no_grad():
        for name, size in NUM_ROWS.items():
            ids = torch.arange(size, dtype=torch.int64)
            getattr(model, name).weight.copy_(seeded_normal_rows(ids, DIM, INIT_STD, 0))
    params = [model.words.weight, model.bags.weight]
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr)
    elif optimizer_name == "adagrad":
        optimizer = torch.optim.Adagrad(params, lr=lr)
    else:
        optimizer = torch.optim.SparseAdam(params, lr=lr)
    for batch in _batches():
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
    return {name: getattr(model, name).weight.detach() for name in NUM_ROWS}


def _train_on_shards(addresses: list[str]) -> RowClient:
    model = _Model()
    tables = ShardedEmbeddings(model, ps=addresses, blocking=True, timeout_s=60)
    try:
        for batch in _batches():
            _loss(model, batch).backward()
            tables.step()
        tables.flush()
    finally:
        tables.close()
    return RowClient(addresses, {name: DIM for name in NUM_ROWS}, timeout_s=60)


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize(
    ("optimizer_name", "flag", "lr"),
    [("sgd", "sgd", 0.1), ("adagrad", "adagrad", 0.1), ("sparse_adam", "adam", 0.05)],
)
def test_rows_on_the_shards_equal_torch_optim_on_one_process(
    shard_cluster, num_shards, optimizer_name, flag, lr
):
    addresses = shard_cluster(
        num_shards,
        *("--row-optimizer", flag, "--row-lr", str(lr), "--row-init-std", str(INIT_STD)),
    )
    expected = _reference(optimizer_name, lr)
    reader = _train_on_shards(addresses)
    try:
        reader.handshake()
        pulled = reader.pull({name: torch.arange(n) for name, n in NUM_ROWS.items()})
        stats = reader.stats()
    finally:
        reader.close()
    for name in NUM_ROWS:
        torch.testing.assert_close(pulled[name], expected[name], rtol=0, atol=1e-6)
    # Rows exist only for ids that were pushed: words only ever used ids below 12.
    rows_held = sum(s["tables"]["words"]["rows"] for s in stats)
    assert rows_held == len(torch.unique(torch.cat([b[0].flatten() for b in _batches()])))
    assert all(s["tables"]["words"]["steps"] == STEPS for s in stats)


def test_rowwise_adagrad_matches_a_reference_written_here(shard_cluster):
    lr, eps = 0.2, 1e-10
    addresses = shard_cluster(
        2, *("--row-optimizer", "rowwise-adagrad", "--row-lr", str(lr)), "--row-init-std", "0.5"
    )
    # One accumulator per row: acc += mean(g^2); w -= lr * g / (sqrt(acc) + eps).
    model = _Model()
    weights = {
        name: seeded_normal_rows(torch.arange(n), DIM, INIT_STD, 0) for name, n in NUM_ROWS.items()
    }
    accumulators = {name: torch.zeros(n, 1) for name, n in NUM_ROWS.items()}
    for batch in _batches():
        for name in NUM_ROWS:
            getattr(model, name).weight = nn.Parameter(weights[name].clone())
        _loss(model, batch).backward()
        for name, ids in zip(NUM_ROWS, batch[:2], strict=True):
            grad = getattr(model, name).weight.grad.to_dense()
            touched = torch.zeros(NUM_ROWS[name], dtype=torch.bool)
            touched[ids.flatten()] = True
            accumulators[name][touched] += grad[touched].square().mean(dim=1, keepdim=True)
            update = grad / (accumulators[name].sqrt() + eps)
            weights[name][touched] -= lr * update[touched]
    reader = _train_on_shards(addresses)
    try:
        reader.handshake()
        pulled = reader.pull({name: torch.arange(n) for name, n in NUM_ROWS.items()})
    finally:
        reader.close()
    for name in NUM_ROWS:
        torch.testing.assert_close(pulled[name], weights[name], rtol=0, atol=1e-6)


def test_only_touched_rows_travel_to_the_shards_that_own_them(shard_cluster):
    addresses = shard_cluster(2)
    framing = {}
    for rows_in_table in (1_000, 1_000_000):
        client = RowClient(addresses, {f"t{rows_in_table}": 32}, timeout_s=60)
        try:
            client.handshake()
            ids = torch.tensor([5, 17, 99_999, 123_456_789_012], dtype=torch.int64)
            client.take_wire_figures()
            client.pull({f"t{rows_in_table}": ids})
            client.push_now({f"t{rows_in_table}": (ids, torch.ones(4, 32))})
            figures = client.take_wire_figures()
        finally:
            client.close()
        # The pull sends 4 ids and gets 4 rows; the push sends 4 ids and 4 gradient rows.
        assert figures["bytes_pulled"] == 4 * 32 * 4
        assert figures["bytes_pushed"] == 2 * 4 * 8 + 4 * 32 * 4
        framing[rows_in_table] = (figures["bytes_pulled"], figures["bytes_pushed"])
    assert framing[1_000] == framing[1_000_000]
    # A client that lists another number of shards (it would send ids to the wrong one).
    partial = RowClient(addresses[:1], {"ids": 2}, timeout_s=60)
    try:
        with pytest.raises(ShardListError, match="one of 2 shards, but 1 was given"):
            partial.handshake()
    finally:
        partial.close()


def test_repeated_ids_in_one_push_are_summed_as_torch_sums_a_sparse_gradient(shard_cluster):
    # The ids and rows of an uncoalesced sparse gradient (nn.Embedding(sparse=True) makes them
    # for a batch that repeats an id); Adagrad, whose state sees one gradient per row and
    # step, tells their sum from two steps. Two shards: the repeats reach both.
    lr, num_rows = 0.5, 40
    addresses = shard_cluster(
        2, *("--row-optimizer", "adagrad", "--row-lr", str(lr), "--row-init-std", "0")
    )
    ids = torch.tensor([7, 3, 7, 30, 3, 7])
    rows = torch.arange(6 * DIM, dtype=torch.float32).view(6, DIM) / 10
    weight = nn.Parameter(torch.zeros(num_rows, DIM))
    weight.grad = torch.sparse_coo_tensor(
        ids.unsqueeze(0), rows, (num_rows, DIM), check_invariants=True
    )
    torch.optim.Adagrad([weight], lr=lr).step()
    client = RowClient(addresses, {"t": DIM}, timeout_s=60)
    try:
        client.handshake()
        client.push_now({"t": (ids, rows)})
        pulled = client.pull({"t": torch.tensor([3, 7, 30])})["t"]
    finally:
        client.close()
    torch.testing.assert_close(pulled, weight.detach()[[3, 7, 30]], rtol=0, atol=1e-6)


def test_ids_of_any_shape_pull_and_push_as_nn_embedding_reads_and_trains(shard_cluster):
    # A batch of [2, 3] ids (repeats included) and a single id: the rows come back shaped as
    # nn.Embedding gives them, and their gradient, pushed with the same ids, steps the rows as
    # torch.optim.SGD steps nn.Embedding(sparse=True). Two shards: the ids reach both.
    lr, num_rows = 0.5, 40
    addresses = shard_cluster(
        2, *("--row-optimizer", "sgd", "--row-lr", str(lr), "--row-init-std", str(INIT_STD))
    )
    ids = torch.tensor([[7, 3, 30], [3, 12, 7]])
    embedding = nn.Embedding(num_rows, DIM, sparse=True)
    with torch.no_grad():
        embedding.weight.copy_(seeded_normal_rows(torch.arange(num_rows), DIM, INIT_STD, 0))
    weights = torch.linspace(-1.0, 1.0, 2 * 3 * DIM).view(2, 3, DIM)
    (embedding(ids) * weights).sum().backward()
    client = RowClient(addresses, {"t": DIM}, timeout_s=60)
    try:
        client.handshake()
        rows = client.pull({"t": ids})["t"]
        single = client.pull({"t": torch.tensor(12)})["t"]
        torch.testing.assert_close(rows, embedding(ids).detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(single, embedding.weight.detach()[12], rtol=0, atol=1e-6)
        rows.requires_grad_()
        (rows * weights).sum().backward()
        client.push_now({"t": (ids, rows.grad)})
        flat = r"^table 't': rows must be \[2, 3, 4\] .* got \[6, 4\]$"
        with pytest.raises(ValueError, match=flat):  # nothing is sent
            client.push_now({"t": (ids, rows.grad.view(6, DIM))})
        pulled = client.pull({"t": ids})["t"]
    finally:
        client.close()
    torch.optim.SGD([embedding.weight], lr=lr).step()
    torch.testing.assert_close(pulled, embedding(ids).detach(), rtol=0, atol=1e-6)


def _shard_stats(addresses: list[str]) -> list[dict]:
    """Each shard's STATS reply, read by a client of the model's tables."""
    reader = RowClient(addresses, {name: DIM for name in NUM_ROWS}, timeout_s=60)
    try:
        return reader.stats()
    finally:
        reader.close()


def test_an_id_past_num_embeddings_is_refused_as_nn_embedding_refuses_it(shard_cluster):
    addresses = shard_cluster(1)
    model = _Model()
    words = torch.tensor([[1, NUM_ROWS["words"], 2]])  # one past the last row
    with pytest.raises(IndexError):
        model.words(words)
    with ShardedEmbeddings(model, ps=addresses, blocking=True, timeout_s=60) as tables:
        wanted = f"^table 'words': id {NUM_ROWS['words']} is out of range for its 40 rows"
        with pytest.raises(ValueError, match=wanted):
            model(words, torch.tensor([[0, 1]]))
        with pytest.raises(ValueError, match=wanted):
            tables.prefetch({"words": words})
        _loss(model, _batches()[0]).backward()  # ids in range still train
        tables.step()
    stats = _shard_stats(addresses)
    assert stats[0]["tables"]["words"]["steps"] == 1


def test_tables_another_sharded_embeddings_still_serves_are_refused_by_name(shard_cluster):
    addresses = shard_cluster(1)
    model = _Model()
    with ShardedEmbeddings(model, ps=addresses, blocking=True, timeout_s=60) as tables:
        with pytest.raises(ValueError, match=r"^table 'words' is served by another Sharded"):
            ShardedEmbeddings(model, ps=addresses, timeout_s=60)
        _loss(model, _batches()[0]).backward()  # the first still has them, and pushes them
        tables.step()
        with ShardedEmbeddings(copy.deepcopy(model), ps=addresses, timeout_s=60):
            pass  # a deep copy's modules are its own: another ShardedEmbeddings may serve them
    with ShardedEmbeddings(model, ps=addresses, blocking=True, timeout_s=60) as again:
        _loss(model, _batches()[1]).backward()  # closed, it let them go: a new one takes them
        again.step()
    stats = _shard_stats(addresses)
    assert stats[0]["tables"]["words"]["steps"] == 2


def test_a_table_of_another_width_is_refused(shard_cluster):
    addresses = shard_cluster(1)
    first = RowClient(addresses, {"items": 8}, timeout_s=60)
    second = RowClient(addresses, {"items": 16}, timeout_s=60)
    try:
        first.handshake()
        with pytest.raises(ModelMismatchError, match="table items holds rows of 8 values"):
            second.handshake()
    finally:
        first.close()
        second.close()


def _rows_held(client: RowClient, table: str) -> tuple[int, int, int]:
    counters = [s["tables"][table] for s in client.stats()]
    return tuple(sum(c[key] for c in counters) for key in ("rows", "admitted", "evicted"))


def test_admission_and_lru_eviction_through_the_shard_flags(shard_cluster):
    # One shard so that the budget of 2 rows is the table's whole budget.
    addresses = shard_cluster(
        1, *("--admit-after", "2", "--max-rows-per-shard", "2", "--row-init-std", "0")
    )
    client = RowClient(addresses, {"ids": 2}, timeout_s=60)
    try:
        client.handshake()

        def push(*ids: int) -> None:
            ids_tensor = torch.tensor(ids, dtype=torch.int64)
            client.push_now({"ids": (ids_tensor, torch.ones(len(ids), 2))})

        push(10, 20)
        assert _rows_held(client, "ids") == (0, 0, 0)  # seen once: no rows yet
        assert torch.equal(client.pull({"ids": torch.tensor([10])})["ids"], torch.zeros(1, 2))
        push(10, 20)  # the second sighting admits both, and their gradient is applied
        assert _rows_held(client, "ids") == (2, 2, 0)
        push(20)
        push(30)
        push(30)  # 30 admitted: 10, the least recently pushed, is evicted
        assert _rows_held(client, "ids") == (2, 3, 1)
        rows = client.pull({"ids": torch.tensor([10, 20, 30])})["ids"]
        assert torch.equal(rows[0], torch.zeros(2))  # evicted: reads as a fresh id
        assert torch.allclose(rows[1], torch.full((2,), -0.1))  # 2 pushes applied at lr 0.05
        push(10)
        push(10)  # back as a new row
        assert _rows_held(client, "ids") == (2, 4, 2)
        assert torch.allclose(
            client.pull({"ids": torch.tensor([10])})["ids"], torch.full((1, 2), -0.05)
        )
    finally:
        client.close()


def _wait_for_saved_rows(checkpoint_dir, version: int, timeout_s: float = 60) -> None:
    path = checkpoint_dir / "rows-shard0.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and json.loads(path.read_text())["version"] >= version:
            return
        time.sleep(0.1)
    raise AssertionError(f"no row checkpoint at version {version} within {timeout_s}s")


def test_a_killed_shard_restores_its_rows_from_its_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    flags = (  # restarted at its address: one no other process takes meanwhile
        *("--bind", f"tcp://{private_loopback()}:0", "--checkpoint-dir", str(checkpoints)),
        *("--checkpoint-every", "0.2", "--row-optimizer", "adam", "--row-lr", "0.1"),
    )
    first, address = start_shard(0, 1, *flags)
    second = None
    client = RowClient([address], {"users": 8, "items": 4}, timeout_s=60, retry_timeout_s=60)
    try:
        client.handshake()
        generator = torch.Generator().manual_seed(0)
        ids = torch.unique(torch.randint(-(2**40), 2**40, (300,), generator=generator))
        for _ in range(5):
            client.push_now(
                {
                    "users": (ids, torch.randn(ids.numel(), 8, generator=generator)),
                    "items": (ids[:50], torch.randn(50, 4, generator=generator)),
                }
            )
        before = client.pull({"users": ids, "items": ids[:50]})
        _wait_for_saved_rows(checkpoints, version=10)  # 5 steps of each of the two tables
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        second, _ = start_shard(0, 1, *flags, "--bind", address)
        # The client's connection was cut: its next requests reconnect to the restarted shard.
        after = client.pull({"users": ids, "items": ids[:50]})
        counters = client.stats()[0]["tables"]
        # Adam's state came back too: one more step matches on a table that kept it.
        client.push_now({"users": (ids[:3], torch.ones(3, 8))})
        stepped = client.pull({"users": ids[:3]})["users"]
    finally:
        client.close()
        stop_processes([p for p in (first, second) if p is not None])
    assert torch.equal(after["users"], before["users"])
    assert torch.equal(after["items"], before["items"])
    assert (counters["users"]["rows"], counters["users"]["steps"]) == (ids.numel(), 5)
    reference = RowTable(8, LazyAdam(0.1), init="normal", init_std=0.01)
    for step_grads in _replayed_user_pushes(ids):
        reference.push(ids, step_grads)
    reference.push(ids[:3], torch.ones(3, 8))
    torch.testing.assert_close(stepped, reference.pull(ids[:3]), rtol=0, atol=1e-6)


_USER_WITH_TABLES = """
import sys, torch
from torch import nn
from distbelief import ShardedEmbeddings
model = nn.Sequential(nn.EmbeddingBag(1000, 8, device="meta"), nn.Linear(8, 1))
with ShardedEmbeddings(model, ps=[sys.argv[1]], timeout_s=1, retry_timeout_s=60) as tables:
    print("training", flush=True)
    for step in range(10**9):
        model(torch.randint(0, 1000, (16, 2))).sum().backward()
        tables.step()
"""


def test_ctrl_c_in_a_with_block_exits_promptly_while_a_shard_is_down():
    """``with ShardedEmbeddings(...)`` ended by Ctrl-C while a shard is down closes at once.
    It flushed instead, waiting out the 60 s of retries, then waited for the requests still
    retrying, and raised ShardUnavailableError over the Ctrl-C."""
    check_ctrl_c_ends_promptly_with_the_shard_gone(_USER_WITH_TABLES)


def _replayed_user_pushes(ids: torch.Tensor) -> list[torch.Tensor]:
    """The users table's gradients of the test above, drawn in the same order."""
    generator = torch.Generator().manual_seed(0)
    torch.randint(-(2**40), 2**40, (300,), generator=generator)
    grads = []
    for _ in range(5):
        grads.append(torch.randn(ids.numel(), 8, generator=generator))
        torch.randn(50, 4, generator=generator)
    return grads


def _train_prefetching(addresses: list[str]) -> None:
    """The test batches with every step's rows prefetched (the first) or fetched while the
    step before computed, blocking: so the same updates as fetching them in the forward pass."""
    model = _Model()
    tables = ShardedEmbeddings(model, ps=addresses, blocking=True, timeout_s=60)
    batches = _batches()
    try:
        tables.prefetch({"words": batches[0][0], "bags": batches[0][1]})
        for step, batch in enumerate(batches):
            if step + 1 < len(batches):
                following = batches[step + 1]
                tables.prefetch_next({"words": following[0], "bags": following[1]})
            _loss(model, batch).backward()
            tables.step()
    finally:
        tables.close()


@contextlib.contextmanager
def _served_here(num_shards: int, settings: RowTableSettings) -> Iterator[list[str]]:
    """Shards served by this process (real sockets, threads): for tests that compare two
    clusters, where starting processes would be most of their time."""
    servers = []
    try:
        for shard_id in range(num_shards):
            shard = ParameterShard(shard_id, num_shards, server_optimizer_factory("sgd", lr=0.1))
            tables = ShardTables(shard_id, num_shards, settings)
            servers.append(serve("tcp://127.0.0.1:0", ShardService(shard, tables=tables)))
        yield [server.address for server in servers]
    finally:
        for server in servers:
            server.stop()


def test_prefetched_rows_train_exactly_as_rows_fetched_in_the_forward_pass():
    settings = RowTableSettings(optimizer="adam", lr=0.05, init_std=INIT_STD)
    with _served_here(2, settings) as plain, _served_here(2, settings) as prefetched:
        _train_on_shards(plain).close()
        _train_prefetching(prefetched)
        pulled = [_pull_everything(addresses) for addresses in (plain, prefetched)]
    for name in NUM_ROWS:
        assert torch.equal(pulled[0][name], pulled[1][name])


def _pull_everything(addresses: list[str]) -> dict[str, torch.Tensor]:
    reader = RowClient(addresses, {name: DIM for name in NUM_ROWS}, timeout_s=60)
    try:
        reader.handshake()
        return reader.pull({name: torch.arange(n) for name, n in NUM_ROWS.items()})
    finally:
        reader.close()


def test_a_pull_past_one_requests_limit_is_split_and_reads_the_same_rows():
    settings = RowTableSettings(optimizer="sgd", lr=0.1, init_std=INIT_STD)
    ids = {"words": torch.tensor([3, 39, 3, 7, 21, 0, 12]), "bags": torch.arange(25).flip(0)}
    with _served_here(2, settings) as addresses:
        whole = _pull_everything(addresses)
        reader = RowClient(addresses, {name: DIM for name in NUM_ROWS}, timeout_s=60)
        try:
            reader.handshake()
            asked = reader.pull(ids)
            reader.max_pull_bytes = 3 * DIM * 4  # three rows a request
            sent = []
            request = reader._request
            reader._request = lambda shard_id, message: (
                sent.append(shard_id) or request(shard_id, message)
            )
            split = reader.pull(ids)
        finally:
            reader.close()
    assert len(sent) >= 32 // 3 + 1 and set(sent) == {0, 1}  # 32 ids, three a request
    for name, table_ids in ids.items():
        assert torch.equal(split[name], asked[name])
        assert torch.equal(split[name], whole[name][table_ids])


def _table_steps(addresses: list[str], config: JobConfig) -> set[int]:
    """The pushes every table of every shard took (each push steps every table everywhere)."""
    reader = RowClient(addresses, {f"tables.{t}": config.model.embedding_dim for t in range(26)})
    try:
        return {c["steps"] for shard in reader.stats() for c in shard["tables"].values()}
    finally:
        reader.close()


def test_a_restarted_click_worker_pushes_each_steps_rows_once(shard_cluster):
    """A click worker's dead life left both shards the rows of its step 6 but not that step's
    dense push (the death came between the two): its next life goes on after step 5, pushes
    step 6's dense update, not its rows, and every shard took each step's rows once."""
    addresses = shard_cluster(2)
    config = JobConfig.from_fields(
        {
            **{"model.name": "dlrm", "data.name": "synthetic-ctr", "data.table_size": 200},
            **{"model.embedding_dim": 4, "optimizer.batch_size": 16, "optimizer.steps": 10},
            **{"cluster.num_workers": 1, "cluster.num_shards": 2, "faults.timeout_s": 10.0},
        }
    )
    told: dict[str, list[int]] = {"started": [], "pushed": []}

    def emit(kind: str, payload: dict) -> None:
        if kind in told:
            told[kind].append(payload["step"])

    run_worker(config, 0, addresses, emit=emit, hooks=[StopAt(5)])
    assert told == {"started": [0], "pushed": [1, 2, 3, 4, 5]}
    assert _table_steps(addresses, config) == {5}
    # Step 6 of the dead life: its rows reached the shards, its dense push never left.
    train_set = load_job_dataset(config.data, "train")
    model = build_ctr_replica(config, train_set)
    with job_tables(config, model, addresses, None, worker_id="worker0") as tables:
        tables.num_steps = 5
        dense, sparse, labels = train_set.dense[:16], train_set.sparse[:16], train_set.labels[:16]
        F.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
        tables.step()
    assert _table_steps(addresses, config) == {6}
    run_worker(config, 0, addresses, emit=emit, resume_step=5, restarted=True)
    assert told == {"started": [0, 5], "pushed": list(range(1, 11))}
    assert _table_steps(addresses, config) == {10}


def test_a_table_no_client_declared_is_refused_saying_how_to_declare_it(shard_cluster):
    addresses = shard_cluster(1)
    client = RowClient(addresses, {"t": DIM}, timeout_s=60)
    try:
        with pytest.raises(RemoteError, match=r"has no table 't' .*RowClient\.handshake\(\)"):
            client.pull({"t": torch.tensor([1, 2])})
        client.handshake()
        assert client.pull({"t": torch.tensor([1, 2])})["t"].shape == (2, DIM)
    finally:
        client.close()


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize(
    "widths", [{"a": 3, "b": 3, "c": 3}, {"a": 2, "b": 5, "c": 3}], ids=["one", "several"]
)
def test_tables_of_one_width_or_several_read_and_train_as_nn_embedding(widths, num_shards):
    # Tables of one width are gathered and scattered together, of several one by one: both
    # read and step as nn.Embedding(sparse=True) and torch.optim.SGD, split pulls included.
    lr, num_rows = 0.5, 50
    embeddings = {name: nn.Embedding(num_rows, dim, sparse=True) for name, dim in widths.items()}
    with torch.no_grad():
        for embedding in embeddings.values():
            initial = seeded_normal_rows(torch.arange(num_rows), embedding.embedding_dim, 0.1, 0)
            embedding.weight.copy_(initial)
    ids = {
        "a": torch.tensor([[7, 3, 30], [3, 12, 7]]),
        "b": torch.tensor([49, 0, 12]),
        "c": torch.zeros(0, dtype=torch.int64),
    }
    grads = {
        name: torch.linspace(-1.0, 1.0, ids[name].numel() * dim).view(*ids[name].shape, dim)
        for name, dim in widths.items()
    }
    everything = {name: torch.arange(num_rows) for name in widths}
    settings = RowTableSettings(optimizer="sgd", lr=lr, init_std=0.1)
    with _served_here(num_shards, settings) as addresses:
        client = RowClient(addresses, widths, timeout_s=60)
        try:
            client.handshake()
            rows = client.pull(ids)
            client.push_now({name: (ids[name], grads[name]) for name in widths})
            pulled = client.pull(everything)
            client.max_pull_bytes = 4 * 4 * 5  # four rows of the widest table a request
            split = client.pull(everything)
        finally:
            client.close()
    for name, embedding in embeddings.items():
        torch.testing.assert_close(rows[name], embedding(ids[name]).detach(), rtol=0, atol=0)
        (embedding(ids[name]) * grads[name]).sum().backward()
    torch.optim.SGD([e.weight for e in embeddings.values()], lr=lr).step()
    for name, embedding in embeddings.items():
        torch.testing.assert_close(pulled[name], embedding.weight.detach(), rtol=0, atol=1e-6)
        assert torch.equal(split[name], pulled[name])


def test_shards_of_other_row_settings_are_said_by_the_setting_that_differs():
    """It was said as both settings' dicts, in their internal names (``max_rows``,
    ``ttl_steps``), naming no flag."""
    servers = []
    try:
        for shard_id, optimizer in enumerate(("adagrad", "adam")):
            shard = ParameterShard(shard_id, 2, server_optimizer_factory("sgd", lr=0.1))
            tables = ShardTables(shard_id, 2, RowTableSettings(optimizer=optimizer))
            servers.append(serve("tcp://127.0.0.1:0", ShardService(shard, tables=tables)))
        addresses = [server.address for server in servers]
        client = RowClient(addresses, {name: DIM for name in NUM_ROWS}, timeout_s=60)
        try:
            with pytest.raises(ConsistencyMismatchError) as refused:
                client.handshake()
        finally:
            client.close()
    finally:
        for server in servers:
            server.stop()
    assert refused.value.field == "embeddings.row_optimizer"
    assert refused.value.problem == (
        f"shard 0 ({addresses[0]}) runs 'adagrad' but shard 1 ({addresses[1]}) runs 'adam'"
    )
