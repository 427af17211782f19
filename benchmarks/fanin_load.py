"""Fan-in load: many lightweight replicas per process against running shards, for a fixed time.

Each replica has its own connection to every shard, opened with the project's dialer (the job
key's handshake included) and introduced with a real HELLO (layout, partitioner), then loops
pull-from-every-shard, push-to-every-shard, as a Downpour worker with n_pull = n_push = 1 does,
with a small model's real slices; no training. A process drives its replicas from one selector
loop over non-blocking sockets, framing requests and decoding replies with the project's own
``send_message`` / ``recv_message``. ``LoadProcesses`` spreads N replicas over a few such
processes, starts them on one clock and gathers pushes per replica, latencies and errors.
Used by ``benchmarks/fanin.py`` and ``tests/integration/test_fanin.py``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import resource
import secrets
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distbelief.client import ParameterServerClient
from distbelief.models import build_model
from distbelief.sharding import FlatLayout, FlatPartitioner, specs_to_json, tensor_specs
from distbelief.wire import Message, ops
from distbelief.wire.channels.tcp import TcpDialer
from distbelief.wire.fd_limit import raise_fd_limit
from distbelief.wire.framing import parse_header, send_message
from distbelief.wire.message import DEFAULT_MAX_PAYLOAD_BYTES, HEADER
from distbelief.wire.reader import FrameReader, recv_message
from distbelief.wire.security import WireSecurity

MODEL_SHAPES = {"mlp": ((1, 8, 8), 10), "lenet": ((1, 32, 32), 10)}
"""Small models and the input each is built for (the digits data set's, CIFAR's)."""
_START_MARGIN_S = 1.0
_CHILD_GRACE_S = 60.0
_ADDRESSES_WAIT_S = 600.0
_SHARD_START_TIMEOUT_S = 120.0
_ADDRESS_LINE = re.compile(r"serving shard (\d+) at (tcp://\S+)")


@dataclass(frozen=True)
class LoadPlan:
    """Which replicas one load process runs, and how."""

    first_replica: int
    num_replicas: int
    model: str = "mlp"
    auth_key: bytes | None = None
    timeout_s: float = 30.0
    """A request unanswered for this long counts as an error (and ends its replica)."""
    connect_timeout_s: float = 30.0


@dataclass
class LoadResult:
    """What the replicas of one run did within the measured window."""

    pushes: list[int] = field(default_factory=list)
    """Completed pushes (to every shard) per replica."""
    push_latency_s: list[float] = field(default_factory=list)
    pull_latency_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connect_s: float = 0.0
    """The slowest process's time to open and introduce all its replicas' connections."""
    load_cpu_s: float = 0.0
    """CPU the load processes used in the window, all together."""
    duration_s: float = 0.0


def model_layout(model: str, num_shards: int):
    """(specs, partitioner, per-shard slices, initial flat parameters) of a small model."""
    input_shape, num_classes = MODEL_SHAPES[model]
    torch.manual_seed(0)
    module = build_model(model, input_shape, num_classes)
    specs = tensor_specs(module.named_parameters())
    partitioner = FlatPartitioner()
    initial = FlatLayout(specs).flatten([p.detach() for p in module.parameters()])
    return specs, partitioner, partitioner.partition(specs, num_shards), initial


def initialise_shards(addresses: list[str], model: str, auth_key: bytes | None) -> None:
    """Give the shards the model's initial parameters (what the first worker does)."""
    specs, partitioner, _, initial = model_layout(model, len(addresses))
    client = ParameterServerClient(
        addresses,
        specs,
        timeout_s=60,
        retry_timeout_s=30,
        security=WireSecurity(auth_key=auth_key),
        partitioner=partitioner,
    )
    try:
        client.handshake(initial)
    finally:
        client.close()


class _Collected:
    """A channel that keeps what ``send_message`` writes (the frame's parts, not copied)."""

    def __init__(self) -> None:
        self.parts: list[memoryview] = []

    def sendall(self, data) -> None:
        self.parts.append(memoryview(data).cast("B"))


class _Received:
    """A channel reading a frame already received (header, then body), for ``recv_message``."""

    def __init__(self, head: bytearray, body: bytearray) -> None:
        self._parts = [memoryview(head), memoryview(body)]

    def recv_into(self, buffer, nbytes: int = 0, /) -> int:
        while self._parts and not self._parts[0].nbytes:
            self._parts.pop(0)
        if not self._parts:
            return 0
        part = self._parts[0]
        count = min(part.nbytes, nbytes or len(buffer), len(buffer))
        memoryview(buffer).cast("B")[:count] = part[:count]
        self._parts[0] = part[count:]
        return count


class _Link:
    """One replica's connection to one shard: a request out, its reply in."""

    __slots__ = ("body", "got", "head", "out", "replica", "sent_at", "shard_id", "sock")

    def __init__(self, replica: _Replica, shard_id: int, sock: socket.socket) -> None:
        self.replica, self.shard_id, self.sock = replica, shard_id, sock
        self.out: list[memoryview] = []
        self.head = bytearray(HEADER.size)
        self.body: bytearray | None = None
        self.got = 0
        self.sent_at = 0.0

    def send(self, message: Message) -> bool:
        """Frame and send (as much as the socket takes now); True: all of it went."""
        frame = _Collected()
        send_message(frame, message)
        self.out, self.sent_at = frame.parts, time.monotonic()
        return self.flush()

    def flush(self) -> bool:
        while self.out:
            try:
                sent = self.sock.send(self.out[0])
            except BlockingIOError:
                return False
            self.out[0] = self.out[0][sent:]
            if not self.out[0].nbytes:
                self.out.pop(0)
        return True

    def receive(self) -> tuple[bytearray, bytearray] | None:
        """Read what has arrived; the frame (header, body) once it is whole.

        Raises:
            ConnectionResetError: the shard closed the connection.
        """
        while True:
            target = self.head if self.body is None else self.body
            if self.got == len(target) and self.body is not None:
                head, body = self.head, self.body
                self.head, self.body, self.got = bytearray(HEADER.size), None, 0
                return head, body
            try:
                count = self.sock.recv_into(memoryview(target)[self.got :])
            except BlockingIOError:
                return None
            if count == 0 and len(target):
                raise ConnectionResetError("the shard closed the connection")
            self.got += count
            if self.body is None and self.got == HEADER.size:
                _, _, _, meta_bytes, payload_bytes = parse_header(
                    self.head, DEFAULT_MAX_PAYLOAD_BYTES
                )
                self.body, self.got = bytearray(meta_bytes + payload_bytes), 0


class _Replica:
    """One lightweight replica: pull from every shard, push to every shard, again."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.session = secrets.token_hex(8)
        self.links: list[_Link] = []
        self.clock = 0
        self.pushes = 0
        self.waiting = 0
        self.pushing = False
        self.failed = False


class _LoadProcess:
    """The replicas of one process and the selector loop that drives them."""

    def __init__(self, plan: LoadPlan, addresses: tuple[str, ...], duration_s: float) -> None:
        self.plan = plan
        self.addresses = addresses
        self.duration_s = duration_s
        specs, self.partitioner, slices, initial = model_layout(plan.model, len(addresses))
        self.specs_json = specs_to_json(specs)
        gradient = {dtype: torch.full_like(flat, 1e-6) for dtype, flat in initial.items()}
        self.grads = [
            [(piece.name, gradient[piece.dtype][piece.start : piece.stop]) for piece in pieces]
            for pieces in slices
        ]
        # Where pulls land: one copy per shard slice, shared by the process's replicas.
        self.params = [
            {piece.name: initial[piece.dtype][piece.start : piece.stop].clone() for piece in pieces}
            for pieces in slices
        ]
        self.selector = selectors.DefaultSelector()
        self.replicas: list[_Replica] = []
        self.push_latency_s: list[float] = []
        self.pull_latency_s: list[float] = []
        self.errors: list[str] = []
        self.measuring = False
        self.end_at = 0.0

    def connect(self) -> None:
        """Open and introduce every replica's connections (blocking, one at a time)."""
        security = WireSecurity(auth_key=self.plan.auth_key)
        dialers = [TcpDialer(address, security=security) for address in self.addresses]
        for index in range(self.plan.num_replicas):
            worker = f"fanin-{self.plan.first_replica + index}"
            replica = _Replica(worker)
            replica.links = [
                self._open_link(replica, shard_id, dialer, worker)
                for shard_id, dialer in enumerate(dialers)
            ]
            self.replicas.append(replica)

    def _open_link(self, replica: _Replica, shard_id: int, dialer, worker: str) -> _Link:
        channel = dialer(self.plan.connect_timeout_s)
        channel.settimeout(self.plan.connect_timeout_s)
        meta = {
            "shard_id": shard_id,
            "specs": self.specs_json,
            "partitioner": self.partitioner.to_json(),
            "worker": worker,
            "clock": 0,
        }
        send_message(channel, Message(ops.HELLO, meta, [], 1))
        reply = recv_message(FrameReader(channel))
        if reply.is_error:
            raise RuntimeError(f"shard {shard_id} refused HELLO: {reply.meta.get('message')}")
        sock = channel.sock
        sock.setblocking(False)
        link = _Link(replica, shard_id, sock)
        self.selector.register(sock, selectors.EVENT_READ, link)
        return link

    def _issue(self, replica: _Replica) -> None:
        """The replica's next round: pulls, or pushes, to every shard."""
        if replica.failed or time.monotonic() >= self.end_at:
            return
        replica.waiting = len(replica.links)
        for link in replica.links:
            if replica.pushing:
                meta = {
                    "worker": replica.worker,
                    "clock": replica.clock,
                    "seq": replica.clock + 1,
                    "session": replica.session,
                }
                message = Message(ops.PUSH, meta, self.grads[link.shard_id], replica.clock + 1)
            else:
                meta = {"worker": replica.worker, "clock": replica.clock, "max_wait_s": 10.0}
                message = Message(ops.PULL, meta, [], replica.clock + 1)
            if not link.send(message):
                self.selector.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)

    def _answered(self, link: _Link, head: bytearray, body: bytearray) -> None:
        replica = link.replica
        sink = self.params[link.shard_id]
        reply = recv_message(
            FrameReader(_Received(head, body)), sink_for=lambda _: lambda name, *_: sink.get(name)
        )
        if reply.is_error:
            self._fail(replica, f"{reply.op.name} refused: {reply.meta.get('message')}")
            return
        if self.measuring:
            latency_s = time.monotonic() - link.sent_at
            (self.push_latency_s if replica.pushing else self.pull_latency_s).append(latency_s)
        replica.waiting -= 1
        if replica.waiting:
            return
        if replica.pushing:
            replica.clock += 1
            if self.measuring:
                replica.pushes += 1
        replica.pushing = not replica.pushing
        self._issue(replica)

    def _fail(self, replica: _Replica, reason: str) -> None:
        if not replica.failed:
            replica.failed = True
            self.errors.append(f"{replica.worker}: {reason}")

    def run(self, start_at: float) -> None:
        """Wait for ``start_at`` (``time.time()``), then drive every replica for the duration;
        only what completes inside the window counts."""
        self.end_at = time.monotonic() + (start_at - time.time()) + self.duration_s
        time.sleep(max(0.0, start_at - time.time()))
        self.measuring = True
        for replica in self.replicas:
            self._issue(replica)
        next_check = time.monotonic() + 1.0
        while (now := time.monotonic()) < self.end_at:
            for key, mask in self.selector.select(min(0.1, self.end_at - now)):
                self._ready(key.data, mask)
            if now > next_check:
                self._check_timeouts(now)
                next_check = now + 1.0
        self.measuring = False

    def _ready(self, link: _Link, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and link.flush():
                self.selector.modify(link.sock, selectors.EVENT_READ, link)
            if mask & selectors.EVENT_READ:
                frame = link.receive()
                if frame is not None:
                    self._answered(link, *frame)
        except Exception as e:  # a reset, a refusal, a frame that breaks the protocol
            self._drop(link, f"shard {link.shard_id}: {type(e).__name__}: {e}")

    def _drop(self, link: _Link, reason: str) -> None:
        self._fail(link.replica, reason)
        self.selector.unregister(link.sock)

    def _check_timeouts(self, now: float) -> None:
        for replica in self.replicas:
            if replica.failed or not replica.waiting:
                continue
            for link in replica.links:
                if now - link.sent_at > self.plan.timeout_s:
                    reason = f"shard {link.shard_id}: no reply in {self.plan.timeout_s:g}s"
                    self._fail(replica, reason)
                    break

    def close(self) -> None:
        for replica in self.replicas:
            for link in replica.links:
                link.sock.close()
        self.selector.close()


def _load_main(plan: LoadPlan, pipe) -> None:
    """A load process: wait for the shards' addresses, connect, report, wait for the start
    time, run, report the figures, keep the connections open until told."""
    torch.set_num_threads(1)
    try:
        if not pipe.poll(_ADDRESSES_WAIT_S) or (message := pipe.recv()) is None:
            return
    except EOFError:  # the parent is gone
        return
    addresses, duration_s = message
    raise_fd_limit(plan.num_replicas * len(addresses) + 256)
    load = _LoadProcess(plan, addresses, duration_s)
    try:
        started = time.monotonic()
        try:
            load.connect()
        except Exception as e:
            pipe.send({"error": f"connecting: {type(e).__name__}: {e}"})
            return
        pipe.send({"connected_s": time.monotonic() - started})
        if not pipe.poll(_CHILD_GRACE_S + duration_s):
            return
        start_at = pipe.recv()
        if start_at is None:  # the parent gave up
            return
        cpu_before = _cpu_s()
        load.run(start_at)
        pipe.send(
            {
                "pushes": [replica.pushes for replica in load.replicas],
                "push_latency_s": load.push_latency_s,
                "pull_latency_s": load.pull_latency_s,
                "errors": load.errors,
                "cpu_s": _cpu_s() - cpu_before,
            }
        )
        pipe.poll(_CHILD_GRACE_S)  # connections stay open until the parent has looked
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone
    finally:
        load.close()
        pipe.close()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def split_replicas(num_replicas: int, num_processes: int) -> list[tuple[int, int]]:
    """(first replica, count) per process, as even as can be."""
    num_processes = max(1, min(num_processes, num_replicas))
    base, extra = divmod(num_replicas, num_processes)
    spans, first = [], 0
    for index in range(num_processes):
        count = base + (1 if index < extra else 0)
        spans.append((first, count))
        first += count
    return spans


class LoadProcesses:
    """``num_replicas`` replicas over ``num_processes`` spawned processes, started (paying for
    their imports) before the shards are known; :meth:`run` then drives them once.

    Args:
        num_replicas: Replicas in all, spread evenly.
        num_processes: Processes of replicas.
        model: One of ``MODEL_SHAPES``.
        auth_key: The job key (None: the shards run without one).
    """

    def __init__(
        self,
        num_replicas: int,
        *,
        num_processes: int = 2,
        model: str = "mlp",
        auth_key: bytes | None = None,
    ) -> None:
        context = mp.get_context("spawn")
        self.num_replicas = num_replicas
        self._processes, self._pipes = [], []
        try:
            for first, count in split_replicas(num_replicas, num_processes):
                plan = LoadPlan(first, count, model, auth_key)
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_load_main, args=(plan, child_end), daemon=True)
                process.start()
                child_end.close()
                self._processes.append(process)
                self._pipes.append(parent_end)
        except BaseException:
            self.close()
            raise

    def run(self, addresses: list[str], duration_s: float, on_window=None) -> LoadResult:
        """Every replica against the shards at ``addresses`` for ``duration_s``.

        The shards must already hold the model (``initialise_shards``). ``on_window(stage)`` is
        called at the start (``"start"``) and the end (``"end"``) of the measured window, and
        once every process has reported but before any closes its connections (``"open"``):
        to sample the shards.

        Raises:
            RuntimeError: a load process could not connect its replicas, or did not report.
        """
        pipes = self._pipes
        for pipe in pipes:
            pipe.send((tuple(addresses), duration_s))
        connect_limit_s = _CHILD_GRACE_S + 5 * self.num_replicas / 100
        connected = [_receive(pipe, connect_limit_s) for pipe in pipes]
        start_at = time.time() + _START_MARGIN_S
        for pipe in pipes:
            pipe.send(start_at)
        on_window = on_window or (lambda stage: None)
        time.sleep(max(0.0, start_at - time.time()))
        on_window("start")
        time.sleep(max(0.0, start_at + duration_s - time.time()))
        on_window("end")
        reports = [_receive(pipe, duration_s + _CHILD_GRACE_S) for pipe in pipes]
        on_window("open")
        for pipe in pipes:
            pipe.send("close")
        result = LoadResult(duration_s=duration_s)
        result.connect_s = max(report["connected_s"] for report in connected)
        for report in reports:
            result.pushes += report["pushes"]
            result.push_latency_s += report["push_latency_s"]
            result.pull_latency_s += report["pull_latency_s"]
            result.errors += report["errors"]
            result.load_cpu_s += report["cpu_s"]
        return result

    def close(self) -> None:
        """Stop every process (ones still waiting for addresses are told to end)."""
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # it has ended already
                pipe.send(None)
        for process in self._processes:
            process.join(2)
            if process.is_alive():  # done with its work, tearing down its interpreter
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for pipe in self._pipes:
            pipe.close()

    def __enter__(self) -> LoadProcesses:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_fanin(
    addresses: list[str],
    num_replicas: int,
    duration_s: float,
    *,
    num_processes: int = 2,
    model: str = "mlp",
    auth_key: bytes | None = None,
    on_window=None,
) -> LoadResult:
    """``LoadProcesses(...).run(...)`` in one call (their start-up not overlapped)."""
    options = {"num_processes": num_processes, "model": model, "auth_key": auth_key}
    with LoadProcesses(num_replicas, **options) as load:
        return load.run(addresses, duration_s, on_window)


def _receive(pipe, timeout_s: float) -> dict:
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"a load process did not report within {timeout_s:g}s")
    report = pipe.recv()
    if isinstance(report, dict) and "error" in report:
        raise RuntimeError(f"a load process failed {report['error']}")
    return report


def start_shards(
    num_shards: int,
    key_file: Path,
    *flags: str,
    log_dir: Path | None = None,
    open_files: tuple[int, int] | None = None,
) -> tuple[list[subprocess.Popen], list[str]]:
    """``distbelief ps`` for each shard on a free port of 127.0.0.1, with the job key and
    ``flags``; returns the processes and their addresses (stop them with ``stop_shards``).

    ``log_dir``: each shard's log goes to ``shard-I.log`` there (default: dropped).
    ``open_files``: (soft, hard) open-file limits the shards start with (default: ours).
    """
    command = [sys.executable, "-m", "distbelief", "ps", "--num-shards", str(num_shards)]
    command += ["--bind", "tcp://127.0.0.1:0", "--auth-key-file", str(key_file), *flags]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    processes: list[subprocess.Popen] = []
    try:
        for shard_id in range(num_shards):
            log_path = os.devnull if log_dir is None else log_dir / f"shard-{shard_id}.log"
            with open(log_path, "w") as log:  # the child keeps its own descriptor
                processes.append(
                    subprocess.Popen(
                        [*command, "--shard-id", str(shard_id)],
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                        env=environment,
                        preexec_fn=limit_open_files,
                    )
                )
        return processes, [_shard_address(process) for process in processes]
    except BaseException:
        stop_shards(processes)
        raise


def _shard_address(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + _SHARD_START_TIMEOUT_S
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = _ADDRESS_LINE.search(line)
        if match:
            return match.group(2)
        if not line and process.poll() is not None:
            break
    raise RuntimeError(f"shard process {process.pid} did not start")


def stop_shards(processes: list[subprocess.Popen]) -> None:
    """SIGTERM, wait, SIGKILL what is left."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
