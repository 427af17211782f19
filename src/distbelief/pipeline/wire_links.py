"""A stage's links to its neighbours over the project's own wire (``StageLinks`` for separate
processes or machines): authenticated like every other connection of the job, with the same
framing, and tensors received straight into reused buffers.

Transfers are pulled towards the previous stage (``stage_protocol.py``), so each stage needs
only the address of the stage after it, and stages can be started last to first. Each stage
but the first serves a ``StageEndpoint`` for the stage before it; each stage but the last holds
two clients of the stage after it: one sends activations, the other fetches gradients by long
poll, so a pending fetch never holds up a send. Both are used by the stage's main thread only.

Every error of the wire becomes a ``PipelineError`` naming this stage, the peer and its
address, and the step and micro-batch: ``StageTimeoutError`` for a peer that did not answer in
time, ``StageUnavailableError`` for one that cannot be reached or went away.
"""

from __future__ import annotations

import threading
import time

import torch

from distbelief.errors import (
    AuthenticationError,
    BindError,
    NotAPeerError,
    NotAStageError,
    PipelineError,
    PSError,
    RemoteError,
    ShardTimeoutError,
    ShardUnavailableError,
    StageTimeoutError,
    StageUnavailableError,
    UnknownOpError,
)
from distbelief.pipeline.links import LinkCounters, payload_bytes
from distbelief.pipeline.micro_buffers import MicroBuffers
from distbelief.pipeline.stage_endpoint import StageEndpoint
from distbelief.pipeline.stage_protocol import (
    ACTIVATION,
    ACTIVATION_NAME,
    GRADIENT,
    GRADIENT_NAME,
    STAGE_HELLO,
    check_index,
    check_plans_agree,
    placed_plan,
    wire_plan,
)
from distbelief.wire.dtypes import dtype_name
from distbelief.wire.message import Message
from distbelief.wire.rpc import connect
from distbelief.wire.rpc_server import serve
from distbelief.wire.security import WireSecurity

__all__ = ["ACTIVATION", "GRADIENT", "STAGE_HELLO", "StageEndpoint", "WireLinks", "wire_links"]

_CONNECT_TIMEOUT_S = 10.0
"""Longest a connection to the next stage may take to open and authenticate."""
_LONG_POLL_S = 10.0
"""How long one gradient fetch asks the next stage to hold it: a re-request every few seconds
costs nothing, and keeps each request's own timeout short."""
_REPLY_MARGIN_S = 10.0
"""Time a fetch allows for the reply beyond the hold (the gradient's transfer)."""
_FIRST_RETRY_PAUSE_S = 0.05
_MAX_RETRY_PAUSE_S = 1.0


def _check_timeout(timeout_s: object) -> float:
    if type(timeout_s) not in (int, float) or not timeout_s >= 0:
        raise ValueError(f"timeout_s must be a number >= 0, got {timeout_s!r}")
    return float(timeout_s)


def _check_key(step: object, micro: object) -> None:
    check_index("step", step)
    check_index("micro", micro)


class WireLinks:
    """Stage ``stage`` of ``num_stages``'s links to its neighbours over TCP (``StageLinks``).

    Args:
        stage: This stage's index, 0 .. num_stages - 1.
        num_stages: Stages in the replica.
        bind: Where this stage serves the stage before it (``tcp://HOST:PORT``, port 0 picks
            one); required unless ``stage`` is 0, for which it is not used.
        next_address: Where the next stage serves; required unless this is the last stage, for
            which it is not used.
        security: The job's key and TLS settings (None: neither), for both sides.
        timeout_s: Limit for sending an activation (the next stage holding it).
        source_host: The address of this machine the connections to the next stage leave
            from (default: the one the operating system picks).
        plan: What the neighbouring stages must agree on, by setting name (the model, its split
            points, ...): compared with each neighbour's when they say hello (None: nothing).
        first_contact_timeout_s: How long, from now, the stage before may take to connect at
            all (stages started by hand, last first, one after another): until it has, a wait
            for its activation lasts at least this long (0: no longer than its own timeout).
        first_step: The step this stage trains first: an activation for a later step is
            refused until this stage asks for the step before it (None: no bound until then).

    ``counters`` count payload bytes on the stage's main thread, within the step that moves
    them: an activation when the next stage acknowledges it (sender) or when this stage takes
    it (receiver), a gradient when this stage leaves it for the previous stage (sender) or
    receives it (receiver). So both stages of a cut count the same bytes for each step.

    Raises:
        ValueError: bad stage numbers, a missing or malformed address, or a bad timeout.
        BindError: ``bind`` cannot be bound (another process holds the port, say).
    """

    def __init__(
        self,
        stage: int,
        num_stages: int,
        *,
        bind: str | None,
        next_address: str | None,
        security: WireSecurity | None,
        timeout_s: float,
        source_host: str | None = None,
        plan: dict[str, object] | None = None,
        first_contact_timeout_s: float = 0.0,
        first_step: int | None = None,
    ) -> None:
        if type(num_stages) is not int or num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
        if type(stage) is not int or not 0 <= stage < num_stages:
            raise ValueError(f"stage must be in 0..{num_stages - 1}, got {stage!r}")
        if stage > 0 and not bind:
            raise ValueError(f"stage {stage} needs a bind address for stage {stage - 1}")
        if stage < num_stages - 1 and not next_address:
            raise ValueError(f"stage {stage} needs the address of stage {stage + 1}")
        self.stage = stage
        self.num_stages = num_stages
        self.timeout_s = _check_timeout(timeout_s)
        self.counters = LinkCounters()
        self._counters_lock = threading.Lock()
        self.plan = wire_plan(plan)
        self.next_address = next_address if stage < num_stages - 1 else None
        self._name = f"stage {stage}"
        self._peer = f"stage {stage + 1} ({next_address})"
        self._gradient_buffers = MicroBuffers()
        self._closed = False
        self._activations = self._gradients = None
        if self.next_address is not None:
            options = {"name": self._peer, "connect_timeout_s": _CONNECT_TIMEOUT_S}
            if source_host:
                options["source_host"] = source_host
            self._activations = connect(self.next_address, security=security, **options)
            self._gradients = connect(self.next_address, security=security, **options)
        self._endpoint: StageEndpoint | None = None
        self._server = None
        if stage > 0:
            self._endpoint = StageEndpoint(
                stage,
                num_stages,
                self._count_bytes,
                self.plan,
                first_contact_timeout_s=first_contact_timeout_s,
                first_step=first_step,
            )
            try:
                # A thread per connection: a handler waits for the stage's own work.
                self._server = serve(bind, self._endpoint, security=security, design="threads")
            except BindError:
                raise  # this stage's own address is what is wrong, not a neighbour
            except PSError as e:
                raise StageUnavailableError(f"{self._name}: cannot serve at {bind}: {e}") from e

    @property
    def address(self) -> str | None:
        """Where this stage serves the stage before it (None for stage 0)."""
        return None if self._server is None else self._server.address

    @property
    def peer_hosts(self) -> set[str]:
        """The hosts the stage before connected from (empty for stage 0)."""
        return set() if self._endpoint is None else set(self._endpoint.peer_hosts)

    def __enter__(self) -> WireLinks:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _count_bytes(self, sent: int, received: int) -> None:
        # The main thread counts; the lock keeps a reader on another thread consistent.
        with self._counters_lock:
            self.counters.bytes_sent += sent
            self.counters.bytes_received += received

    def _check_open(self, method: str, needs_next: bool) -> None:
        if self._closed:
            raise RuntimeError(f"{self._name}: {method} after the links were closed")
        if needs_next and self.next_address is None:
            raise RuntimeError(f"{self._name} is the last stage: it has no next stage to {method}")
        if not needs_next and self._endpoint is None:
            raise RuntimeError(
                f"{self._name} is the first stage: it has no stage before to {method}"
            )

    def _translate(
        self, error: PSError, what: str, verb: str, timeout_s: float
    ) -> PipelineError | AuthenticationError:
        """The ``PipelineError`` for ``error`` of the wire, met while moving ``what``; an
        ``AuthenticationError`` stays one (another job key or TLS setting than the next
        stage's: a flag is wrong, as a shard's refusal says), in words that name the stage."""
        detail = str(error).removeprefix(f"{self._peer}: ")
        if isinstance(error, AuthenticationError):
            detail = detail.replace("the shard", "the next stage")
            return type(error)(f"{self._name}: {self._peer}: {detail}")
        if isinstance(error, ShardTimeoutError):
            return StageTimeoutError(
                f"{self._name}: {self._peer} did not {verb} {what} within {timeout_s:g}s"
            )
        if isinstance(error, ShardUnavailableError):
            return StageUnavailableError(
                f"{self._name}: cannot reach {self._peer} for {what}: {detail}"
            )
        if isinstance(error, RemoteError):
            detail = detail.split(" refused: ", 1)[-1]
            return PipelineError(f"{self._name}: {self._peer} refused {what}: {detail}")
        return PipelineError(f"{self._name}: cannot speak to {self._peer} for {what}: {detail}")

    def wait_for_peer(self, timeout_s: float) -> None:
        """Wait until the next stage answers, and check it is stage ``stage + 1`` of the same
        number of stages with the same plan (the last stage has nothing to wait for; the next
        stage checks the plan too). Unreachable peers are tried again until ``timeout_s``.

        Raises:
            StageUnavailableError: the next stage could not be reached within ``timeout_s``.
            PipelineError: it is another stage, or refused this stage (another job key, say).
            NotAStageError: the address answers, but not as a stage (a shard, say).
            ConfigFieldError: its plan differs (naming the setting and both values).
        """
        timeout_s = _check_timeout(timeout_s)
        if self._closed:
            raise RuntimeError(f"{self._name}: wait_for_peer after the links were closed")
        if self._activations is None:
            return
        deadline = time.monotonic() + timeout_s
        pause_s = _FIRST_RETRY_PAUSE_S
        request = {"stage": self.stage, "num_stages": self.num_stages, "plan": self.plan}
        while True:
            remaining_s = max(0.001, deadline - time.monotonic())
            try:
                reply = self._activations.request(
                    Message(STAGE_HELLO, dict(request)), timeout_s=remaining_s
                )
                break
            except (ShardUnavailableError, ShardTimeoutError) as e:
                if time.monotonic() + pause_s >= deadline:
                    detail = str(e).removeprefix(f"{self._peer}: ")
                    raise StageUnavailableError(
                        f"{self._name}: {self._peer} could not be reached within "
                        f"{timeout_s:g}s: {detail}"
                    ) from e
                time.sleep(pause_s)
                pause_s = min(2 * pause_s, _MAX_RETRY_PAUSE_S)
            except (UnknownOpError, NotAPeerError) as e:
                raise NotAStageError(
                    f"{self._name}: {self.next_address} is not a pipeline stage (it answers no "
                    "stage hello; a shard, say): give the next stage's --bind address"
                ) from e
            except PSError as e:
                raise self._translate(e, "the stage check", "answer", timeout_s) from e
        found = (reply.meta.get("stage"), reply.meta.get("num_stages"))
        if found[0] != self.stage + 1:
            raise PipelineError(
                f"{self._name} of {self.num_stages}: {self.next_address} is stage {found[0]} of "
                f"{found[1]}, not stage {self.stage + 1} of {self.num_stages}: check the stage "
                "addresses"
            )
        # The next place answered: another number of stages there is another --partitions,
        # named before the settings that follow from it.
        check_plans_agree(
            placed_plan(self.num_stages, self.plan),
            placed_plan(found[1], reply.meta.get("plan")),
            self._name,
            self._peer,
        )

    def send_forward(self, step: int, micro: int, activation: torch.Tensor) -> None:
        """Send the activation of (``step``, ``micro``) to the next stage; returns once it
        holds it. The tensor is sent from its own memory (a copy only if it is not contiguous
        or not on the CPU).

        Raises:
            StageTimeoutError: the next stage did not take it within the links' ``timeout_s``.
            StageUnavailableError: the next stage cannot be reached.
            PipelineError: the next stage refused it (out of order, or another stage).
        """
        self._check_open("send_forward", needs_next=True)
        _check_key(step, micro)
        tensor = activation.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        dtype_name(tensor.dtype)  # a dtype that cannot travel fails here, in one clear line
        meta = {"stage": self.stage, "step": step, "micro": micro}
        request = Message(ACTIVATION, meta, [(ACTIVATION_NAME, tensor)])
        assert self._activations is not None
        try:
            self._activations.request(request, timeout_s=self.timeout_s)
        except PSError as e:
            what = f"the activation of step {step}, micro-batch {micro}"
            raise self._translate(e, what, "take", self.timeout_s) from e
        self._count_bytes(payload_bytes(tensor), 0)

    def recv_forward(self, step: int, micro: int, timeout_s: float) -> torch.Tensor:
        """The previous stage's activation of (``step``, ``micro``), in this micro-batch's
        receive buffer (the same tensor at every step while its shape and dtype stay).

        Raises:
            StageTimeoutError: it did not arrive within ``timeout_s``.
            PipelineError: the previous stage already sent a later step for ``micro``.
        """
        self._check_open("recv_forward", needs_next=False)
        _check_key(step, micro)
        assert self._endpoint is not None
        return self._endpoint.take_activation(step, micro, _check_timeout(timeout_s))

    def send_backward(self, step: int, micro: int, grad: torch.Tensor) -> None:
        """Leave the gradient of (``step``, ``micro``) for the previous stage to fetch (copied
        into this micro-batch's outbox; returns at once).

        Raises:
            ValueError: ``grad``'s dtype cannot travel.
            PipelineError: the previous stage has not fetched this micro-batch's gradient of an
                earlier step, or the step does not come after it.
        """
        self._check_open("send_backward", needs_next=False)
        _check_key(step, micro)
        assert self._endpoint is not None
        self._endpoint.deposit_gradient(step, micro, grad)

    def recv_backward(self, step: int, micro: int, timeout_s: float) -> torch.Tensor:
        """The next stage's gradient for this stage's output of (``step``, ``micro``), in this
        micro-batch's receive buffer. Asked for by long poll until ``timeout_s``.

        Raises:
            StageTimeoutError: it was not deposited within ``timeout_s`` (or the next stage
                stopped answering for a further margin).
            StageUnavailableError: the next stage cannot be reached, or closed.
            PipelineError: the next stage refused (it holds a later step: this one is gone).
        """
        self._check_open("recv_backward", needs_next=True)
        _check_key(step, micro)
        timeout_s = _check_timeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        what = f"the gradient of step {step}, micro-batch {micro}"

        def sink(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            if name != GRADIENT_NAME:
                raise ValueError(f"a gradient reply carries {GRADIENT_NAME!r}, not {name!r}")
            return self._gradient_buffers.get(micro, dtype, shape)

        assert self._gradients is not None
        while True:
            hold_s = max(0.0, min(deadline - time.monotonic(), _LONG_POLL_S))
            meta = {"stage": self.stage, "step": step, "micro": micro, "max_wait_s": hold_s}
            try:
                reply = self._gradients.request(
                    Message(GRADIENT, meta), timeout_s=hold_s + _REPLY_MARGIN_S, sink=sink
                )
            except PSError as e:
                raise self._translate(e, what, "return", timeout_s) from e
            if reply.meta.get("closed"):
                raise StageUnavailableError(
                    f"{self._name}: {self._peer} closed its links while {self._name} waited for "
                    f"{what}"
                )
            if not reply.meta.get("held"):
                break
            if time.monotonic() >= deadline:
                raise StageTimeoutError(
                    f"{self._name}: {self._peer} did not return {what} within {timeout_s:g}s"
                )
        if len(reply.tensors) != 1:
            raise PipelineError(
                f"{self._name}: {self._peer} answered {what} with {len(reply.tensors)} tensors"
            )
        tensor = reply.tensors[0][1]
        self._count_bytes(0, payload_bytes(tensor))
        return tensor

    def fail(self, error: BaseException, timeout_s: float) -> bool:
        """This stage cannot train (``error``, met before its first step): refuse the stage
        before's requests with it (in one line), so that it reports the cause instead of
        retrying its connection, and wait up to ``timeout_s`` until it was told; whether it
        was (stage 0, which has no stage before: True at once)."""
        if self._endpoint is None or self._closed:
            return True
        lines = str(error).strip().splitlines()
        problem = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        return self._endpoint.fail(problem, _check_timeout(timeout_s))

    def drain(self, timeout_s: float) -> bool:
        """After this stage's last step: close the connections to the next stage (this stage is
        done with it), then wait until the previous stage has fetched every gradient and closed
        its connections, up to ``timeout_s``; whether it did. Call before :meth:`close` on the
        way out of a finished run (not after a failure: then close at once)."""
        if self._closed:
            raise RuntimeError(f"{self._name}: drain after the links were closed")
        for client in (self._activations, self._gradients):
            if client is not None:
                client.close()
        if self._endpoint is None:
            return True
        return self._endpoint.wait_until_released(_check_timeout(timeout_s))

    def close(self) -> None:
        """Stop serving the previous stage and drop the connections to the next (idempotent);
        a later call of any other method raises RuntimeError."""
        if self._closed:
            return
        self._closed = True
        if self._endpoint is not None:
            self._endpoint.close()  # held fetches answer "closed" instead of waiting out
        if self._server is not None:
            self._server.stop()
        for client in (self._activations, self._gradients):
            if client is not None:
                client.close()


wire_links = WireLinks
"""Stage ``stage``'s links over the wire, serving at ``bind`` (stages > 0) and talking to the
next stage at ``next_address`` (all but the last): the class itself, by the name the other
link makers (``local_links``) follow."""
