"""A shard process on this host, through shared memory: pulls read its shared parameters with
no request (the same values as a pull by request, never a torn copy while another client
pushes, counted as pulls); pushes leave their gradient in buffers the shard applies from (the
same update as pushed tensors). Once the shard is killed its last values are never read: the
pull fails over to a request, and the memory is unmapped."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from distbelief.client import ParameterServerClient
from distbelief.errors import PSError
from distbelief.optim import DownpourSGD
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.wire import shared_params
from distbelief.wire.shared_params import SharedParamsReader
from tests.conftest import pause_process, private_loopback, start_shard, stop_processes

pytestmark = pytest.mark.skipif(
    shared_params.supported() is not None, reason=str(shared_params.supported())
)

NUMEL = 2_000_000
"""8 MB: an update takes long enough that reads overlap it."""
PUSHES = 60
SPECS = tensor_specs([("w", torch.zeros(NUMEL))])


@pytest.fixture
def shard(monkeypatch):
    """A shard process on loopback (SGD, lr 1: after version v every element is -v)."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "auto")
    process, address = start_shard(0, 1, "--server-lr", "1")
    yield process, address
    stop_processes([process])


def _client(address: str, worker: str, **options) -> ParameterServerClient:
    client = ParameterServerClient([address], SPECS, timeout_s=30, worker_id=worker, **options)
    client.handshake(FlatLayout(SPECS).allocate())
    return client


def _shared(client: ParameterServerClient):
    """What shard 0 agreed to share with ``client`` (None: not asked, or ended)."""
    assert client._shared_memory is not None
    return client._shared_memory._shards[0]


def _reader(client: ParameterServerClient):
    shared = _shared(client)
    return None if shared is None else shared.reader


def _direct_reads(client: ParameterServerClient) -> int:
    assert client._shared_memory is not None
    return client._shared_memory._unreported[0]


def _mapped_shared_params() -> set[str]:
    """The inodes of shards' shared parameters this process maps (those of shards served in
    this process by other tests included)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split()[4] for line in lines if "distbelief-params" in line}


def test_a_same_host_pull_reads_shared_memory_and_counts_as_a_pull(shard):
    _, address = shard
    mapped_before = _mapped_shared_params()
    client = _client(address, "w0")
    try:
        client.take_wire_figures()  # the handshake's
        flats = FlatLayout(SPECS).allocate()
        ones = {dtype: torch.ones_like(flat) for dtype, flat in flats.items()}
        assert client.push_now(ones, clock=1) == [1]
        assert client.pull_now(flats, clock=1) == [1]
        assert isinstance(_reader(client), SharedParamsReader)
        assert bool((flats[torch.float32] == -1.0).all())
        # The same values through a request.
        shared_memory, client._shared_memory = client._shared_memory, None
        by_request = FlatLayout(SPECS).allocate()
        assert client.pull_now(by_request, clock=1) == [1]
        assert torch.equal(by_request[torch.float32], flats[torch.float32])
        client._shared_memory = shared_memory
        # The direct read is reported with the next push: two pulls in all.
        assert client.push_now(ones, clock=2) == [2]
        stats = client.stats()[0]
        assert stats["num_pulls"] == 2
        # Both pushes were placed in the push buffers: no gradient byte was received. The
        # shard counts them, and the direct read, as bytes moved through shared memory (what
        # the launcher's progress and metrics add to the socket's bytes).
        assert _shared(client).mapped
        assert stats["bytes_received"] == 0
        assert stats["bytes_sent"] == 4 * NUMEL  # the pull by request
        assert stats["bytes_shared"] == 3 * 4 * NUMEL
        # The worker's own figures (metrics.csv's bytes_pushed and bytes_pulled) count them
        # alike: two pushes, the direct read and the pull by request.
        figures = client.take_wire_figures()
        assert (figures["bytes_pushed"], figures["bytes_pulled"]) == (2 * 4 * NUMEL, 2 * 4 * NUMEL)
    finally:
        client.close()
    assert _mapped_shared_params() <= mapped_before


@pytest.mark.parametrize("flags", [("--max-staleness", "2"), ("--server-optimizer", "adam")])
def test_placed_pushes_update_as_pushed_tensors_do(monkeypatch, flags):
    """Also where pulls must stay requests (SSP holds them): only the pushes are placed."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "auto")
    processes = []
    try:
        addresses = []
        for _ in range(2):
            process, address = start_shard(0, 1, "--server-lr", "0.5", *flags)
            processes.append(process)
            addresses.append(address)
        placed = _client(addresses[0], "w0")
        by_request = _client(addresses[1], "w0", shared_memory=False)
        try:
            torch.manual_seed(0)
            for clock in range(1, 4):
                grads = {torch.float32: torch.randn(NUMEL)}
                placed.push_now(grads, clock=clock)
                by_request.push_now(grads, clock=clock)
            assert _shared(placed).mapped
            assert (_reader(placed) is None) == (flags[0] == "--max-staleness")
            ours, theirs = FlatLayout(SPECS).allocate(), FlatLayout(SPECS).allocate()
            assert placed.pull_now(ours, clock=3) == by_request.pull_now(theirs, clock=3) == [3]
            assert torch.equal(ours[torch.float32], theirs[torch.float32])
        finally:
            placed.close()
            by_request.close()
    finally:
        stop_processes(processes)


def test_a_push_from_the_shared_outbox_is_applied_where_it_lies_and_left_as_it_was(monkeypatch):
    """The shard divides a stale push by its staleness (``scale``) in its own buffers, not in
    the client's outbox, which its replay record sums."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "auto")
    process, address = start_shard(0, 1, "--server-lr", "1", "--staleness-policy", "scale")
    try:
        client = _client(address, "w0")
        try:
            outbox = client.shared_outbox(FlatLayout(SPECS).sizes)
            outbox[torch.float32].fill_(1.0)
            assert client.push_now(outbox, clock=1) == [1]
            assert client.push_now(outbox, clock=2) == [2]
            assert client.push_now(outbox, clock=3, base_versions=[0]) == [3]  # staleness 2
            assert bool((outbox[torch.float32] == 1.0).all())
            # Placed where it lies: no push buffers of the client's own were needed.
            assert _shared(client).mapped and _shared(client).buffers is None
            pulled = FlatLayout(SPECS).allocate()
            client.pull_now(pulled)
            assert bool((pulled[torch.float32] == -2.5).all())  # -1 - 1 - 1/2
        finally:
            client.close()
    finally:
        stop_processes([process])


def _mapped_push_buffers() -> set[str]:
    """The inodes of clients' push buffers (shared outboxes included) this process maps."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split()[4] for line in lines if "distbelief-push-buffers" in line}


@pytest.mark.parametrize(
    ("wire_dtype", "push_compression"), [("bf16", "none"), ("fp32", "topk:0.5")]
)
def test_a_worker_with_compressed_pushes_keeps_no_shared_outbox(
    monkeypatch, wire_dtype, push_compression
):
    """Compressed pushes travel encoded, never from shared memory: such a worker sets none
    aside for them, and trains through shared-memory channels all the same."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "auto")
    process, address = start_shard(0, 1, "--server-lr", "0.1")
    mapped_before = _mapped_push_buffers()
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        inputs = torch.randn(64, 8)
        targets = inputs @ torch.randn(8, 1)

        @torch.no_grad()
        def loss_of(net: torch.nn.Module) -> float:
            return float(torch.nn.functional.mse_loss(net(inputs), targets))

        first_loss = loss_of(model)
        optimizer = DownpourSGD(
            model.parameters(),
            lr=0.1,
            model=model,
            ps=[address],
            blocking=True,
            timeout_s=30,
            wire_dtype=wire_dtype,
            push_compression=push_compression,
        )
        try:
            assert optimizer.client._transports[0].memory_channel is not None
            for _ in range(40):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(inputs), targets).backward()
                optimizer.step()
            assert not optimizer.client._shared_memory._outboxes
            assert not _mapped_push_buffers() - mapped_before
        finally:
            optimizer.close()
        trained = torch.nn.Linear(8, 1)
        specs = tensor_specs(list(trained.named_parameters()))
        reader = ParameterServerClient([address], specs, timeout_s=30)
        try:
            flats = FlatLayout(specs).allocate()
            reader.handshake(None)
            reader.pull_now(flats)
        finally:
            reader.close()
        with torch.no_grad():
            for param, value in zip(
                trained.parameters(), FlatLayout(specs).views(flats), strict=True
            ):
                param.copy_(value)
        assert loss_of(trained) < first_loss / 4
    finally:
        stop_processes([process])


def test_a_closed_optimizer_lets_go_of_its_shared_outbox(monkeypatch):
    """close() unmaps the model-sized outbox at once: a script that goes on after training
    (evaluating, saving) does not keep it until the optimizer is collected."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "auto")
    process, address = start_shard(0, 1, "--server-lr", "0.1")
    mapped_before = _mapped_push_buffers()
    try:
        model = torch.nn.Linear(8, 1)
        optimizer = DownpourSGD(
            model.parameters(), lr=0.1, model=model, ps=[address], blocking=True, timeout_s=30
        )
        try:
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(4, 8)).sum().backward()
                optimizer.step()
            assert _mapped_push_buffers() - mapped_before  # pushes went from the outbox
        finally:
            optimizer.close()
        assert not _mapped_push_buffers() - mapped_before
    finally:
        stop_processes([process])


def test_reads_while_another_client_pushes_are_never_torn(shard):
    _, address = shard
    pusher, reader = _client(address, "pusher"), _client(address, "reader")
    stop = threading.Event()
    pushed: list[int] = []

    def push_continuously() -> None:
        ones = {dtype: torch.ones_like(f) for dtype, f in FlatLayout(SPECS).allocate().items()}
        while not stop.is_set() and len(pushed) < PUSHES:
            pushed.append(pusher.push_now(ones)[0])

    thread = threading.Thread(target=push_continuously, daemon=True)
    try:
        flats = FlatLayout(SPECS).allocate()
        thread.start()
        reads, direct = 0, 0
        deadline = time.monotonic() + 120
        while thread.is_alive() and time.monotonic() < deadline:
            before = _direct_reads(reader)
            version = reader.pull_now(flats)[0]
            direct += _direct_reads(reader) - before
            values = flats[torch.float32]
            # Every element of one snapshot has the same value, that of its version.
            assert float(values.min()) == float(values.max()) == -float(version)
            reads += 1
        assert len(pushed) == PUSHES, "the pusher did not finish in time"
        assert direct > 0, f"none of {reads} pulls read shared memory"
    finally:
        stop.set()
        thread.join(60)
        pusher.close()
        reader.close()


def test_a_killed_shard_is_never_read_and_its_memory_is_let_go(shard):
    process, address = shard
    mapped_before = _mapped_shared_params()
    # A short retry bounds only the failure path: the shard is gone for good.
    client = _client(address, "w0", retry_timeout_s=2.0)
    try:
        flats = FlatLayout(SPECS).allocate()
        assert client.pull_now(flats) == [0]
        assert isinstance(_reader(client), SharedParamsReader)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        with pytest.raises(PSError):
            client.pull_now(flats)
        assert _reader(client) is None  # asked again of whichever shard answers next
        assert _mapped_shared_params() <= mapped_before
        assert not [name for name in os.listdir("/dev/shm") if f"-{process.pid}-" in name]
    finally:
        client.close()


@pytest.mark.timeout(300)
def test_a_killed_shards_parameters_are_let_go_while_its_push_is_retried(monkeypatch, tmp_path):
    """A shard that dies under a push in flight: while the push is retried, the worker no
    longer maps the dead shard's parameters (their memory is freed); the shard's next life
    takes the push and is read through shared memory of its own."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "auto")
    saved = ("--server-lr", "1", "--checkpoint-dir", str(tmp_path))
    # Restarted at its address: one no other process takes meanwhile.
    process, address = start_shard(0, 1, *saved, "--bind", f"tcp://{private_loopback()}:0")
    processes = [process]
    mapped_before = _mapped_shared_params()
    try:
        client = _client(address, "w0", retry_timeout_s=180)
        try:
            ones = {torch.float32: torch.ones(NUMEL)}
            assert client.push_now(ones, clock=1) == [1]
            flats = FlatLayout(SPECS).allocate()
            assert client.pull_now(flats, clock=1) == [1]
            dead = _mapped_shared_params() - mapped_before
            assert dead, "the shard's parameters were not mapped"
            # Killed with it in flight, the shard leaves the push to be retried until its next
            # life answers.
            futures = _push_then_kill(client, process, ones, clock=2)
            deadline = time.monotonic() + 60  # a loaded machine may notice the death late
            while _mapped_shared_params() & dead and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _mapped_shared_params() & dead, "the dead shard's parameters stay mapped"
            assert not futures[0].done(), "the push gave up instead of being retried"
            restarted, _ = start_shard(0, 1, *saved, "--bind", address)
            processes.append(restarted)
            assert client.wait(futures) == [2]
            assert client.pull_now(flats, clock=2) == [2]
            assert bool((flats[torch.float32] == -2.0).all())
            assert isinstance(_reader(client), SharedParamsReader)
            assert _mapped_shared_params() - mapped_before - dead
        finally:
            client.close()
    finally:
        stop_processes(processes)


def _sent_on_ring(client: ParameterServerClient) -> int:
    """Where shard 0's shared-memory connection writes its next bytes (moves with each
    request sent)."""
    channel = client._transports[0].memory_channel
    assert channel is not None
    return channel._write_at


def _push_then_kill(client: ParameterServerClient, process, grads: dict, clock: int) -> list:
    """Sends a push to a shard stopped with SIGSTOP (it takes the push, never answers), then
    SIGKILLs the shard with the push in flight; returns the push's futures."""
    pause_process(process.pid)
    written = _sent_on_ring(client)
    futures = client.push(grads, clock=clock)
    deadline = time.monotonic() + 30
    while _sent_on_ring(client) == written and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _sent_on_ring(client) != written, "the push was not sent"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return futures


def test_a_placed_push_retried_on_a_shard_that_cannot_map_it_goes_with_its_tensors(
    monkeypatch, tmp_path
):
    """A push placed in shared memory whose shard dies before answering is retried on the
    shard's next life. One that takes TCP only (or cannot map the client's memory) refuses a
    placed push: the client sends the push's tensors instead, and nothing is lost."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "auto")
    saved = ("--server-lr", "1", "--checkpoint-dir", str(tmp_path))
    # Restarted at its address: one no other process takes meanwhile.
    process, address = start_shard(0, 1, *saved, "--bind", f"tcp://{private_loopback()}:0")
    processes = [process]
    try:
        client = _client(address, "w0")
        try:
            ones = {torch.float32: torch.ones(NUMEL)}
            assert client.push_now(ones, clock=1) == [1]
            assert _shared(client).mapped
            futures = _push_then_kill(client, process, ones, clock=2)
            restarted, _ = start_shard(0, 1, *saved, "--bind", address, "--transport", "tcp")
            processes.append(restarted)
            client.wait(futures)
            pulled = FlatLayout(SPECS).allocate()
            client.pull_now(pulled, clock=2)
            # The first push (re-sent from the replay buffer) and the second: both applied.
            assert bool((pulled[torch.float32] == -2.0).all())
        finally:
            client.close()
    finally:
        stop_processes(processes)


def test_the_debug_log_says_why_a_tcp_connection_pulls_and_pushes_by_request(monkeypatch, caplog):
    """Under the transport tcp the connection to a shard of this host stays TCP: its pulls and
    pushes go as requests, and the debug log says why (once), as it does for a refusal."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    process, address = start_shard(0, 1, "--server-lr", "1")
    caplog.set_level(logging.DEBUG, logger="distbelief.client")
    client = _client(address, "w0")
    try:
        flats = FlatLayout(SPECS).allocate()
        for clock in (1, 2):
            assert client.pull_now(flats, clock=clock) == [0]
    finally:
        client.close()
        stop_processes([process])
    said = [r.getMessage() for r in caplog.records if "by request" in r.getMessage()]
    assert said == ["pulls and pushes by request: the transport is tcp"]
