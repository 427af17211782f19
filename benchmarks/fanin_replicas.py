"""Fan-in replicas: many lightweight replicas in one process, driven by one selector loop.

Each replica has its own connection to every shard, opened with the project's dialer (the job
key's handshake included) and introduced with a real HELLO (layout, partitioner), then loops
pull-from-every-shard, push-to-every-shard, as a Downpour worker with n_pull = n_push = 1 does,
with a small model's real slices; no training. Requests are framed and replies decoded with the
project's own ``send_message`` / ``recv_message``, over non-blocking sockets. One process's
side of ``fanin_load.py``.
"""

from __future__ import annotations

import secrets
import selectors
import socket
import time
from dataclasses import dataclass

import torch

from distbelief.models import build_model
from distbelief.sharding import FlatLayout, FlatPartitioner, specs_to_json, tensor_specs
from distbelief.wire import Message, ops
from distbelief.wire.channels.tcp import TcpDialer
from distbelief.wire.framing import parse_header, send_message
from distbelief.wire.message import DEFAULT_MAX_PAYLOAD_BYTES, HEADER
from distbelief.wire.reader import FrameReader, recv_message
from distbelief.wire.security import WireSecurity

MODEL_SHAPES = {"mlp": ((1, 8, 8), 10), "lenet": ((1, 32, 32), 10)}
"""Small models and the input each is built for (the digits data set's, CIFAR's)."""


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


def model_layout(model: str, num_shards: int):
    """(specs, partitioner, per-shard slices, initial flat parameters) of a small model."""
    input_shape, num_classes = MODEL_SHAPES[model]
    torch.manual_seed(0)
    module = build_model(model, input_shape, num_classes)
    specs = tensor_specs(module.named_parameters())
    partitioner = FlatPartitioner()
    initial = FlatLayout(specs).flatten([p.detach() for p in module.parameters()])
    return specs, partitioner, partitioner.partition(specs, num_shards), initial


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


class ReplicaLoop:
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
