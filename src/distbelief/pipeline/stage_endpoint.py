"""The server side of a stage's link to the stage before it: the activations that stage sends
here, and the gradients this stage leaves for it to fetch.

Every stage but the first serves a ``StageEndpoint`` (a ``wire`` Service). Each micro-batch
index has a slot in the inbox (activations, received straight into a reused buffer) and one in
the outbox (gradients, copied into a reused buffer until fetched). A slot remembers the step it
holds and whether its tensor was taken, which is how out-of-order traffic is caught:

- an activation may only arrive for a slot whose previous activation was taken, for a later
  step than it held, and at most one step past the latest the main thread asked for (the
  stage before sends step s + 1 only once it fetched the gradients of step s, which this stage
  leaves after taking step s's activations; before any ask, the first step);
- the stage's main thread waits for the slot to hold exactly the step it asks for (an older
  step means not yet, a newer one is a protocol violation);
- a gradient fetch for an older step than the outbox holds is refused (it is gone), one for a
  newer step waits.

Buffers are reused without a copy because the schedule keeps them apart: the stage before
sends the activation of (step + 1, micro) only after it has fetched the gradient of (step,
micro), which this stage deposits once it is done with that micro-batch's activation.

The stage before says hello with its plan; one that differs from this stage's is refused on
this side too: the main thread's next wait raises the difference.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distbelief.errors import ConfigFieldError, PipelineError, StageTimeoutError
from distbelief.pipeline.links import payload_bytes
from distbelief.pipeline.micro_buffers import MicroBuffers
from distbelief.pipeline.stage_protocol import (
    ACTIVATION,
    ACTIVATION_NAME,
    GRADIENT,
    GRADIENT_NAME,
    NUM_MICRO_KEY,
    STAGE_HELLO,
    check_plans_agree,
    hold_of,
    micro_batch_key,
    placed_plan,
    wire_plan,
)
from distbelief.wire.dtypes import dtype_name
from distbelief.wire.framing import Sink
from distbelief.wire.message import Message
from distbelief.wire.ops import OpRegistry

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Slot:
    """What one micro-batch index of the inbox or outbox holds."""

    step: int = -1
    """The step of the tensor held (-1: none yet)."""
    buffer: torch.Tensor | None = None
    taken: bool = True
    """Inbox: the main thread took the activation. Outbox: a fetch carried the gradient away."""
    receiving: bool = False
    """Inbox only: an activation is being received into ``buffer`` right now."""


class StageEndpoint:
    """Serves one stage's side of the link to the stage before it (a ``wire.Service``).

    The main thread of the stage calls :meth:`take_activation` and :meth:`deposit_gradient`;
    the server's connection threads run the handlers.

    Args:
        stage: This stage's index (> 0: the first stage has no stage before it).
        num_stages: Stages in the replica.
        count_bytes: Called with (bytes sent, bytes received) by the stage's main thread when
            it takes an activation or leaves a gradient, so that a step's bytes are counted in
            that step (not when the stage before happens to fetch them).
        plan: What the stage before must agree on (see ``stage_protocol``); None: nothing.
        first_contact_timeout_s: How long, from now, the stage before may take to connect at
            all: until it has, :meth:`take_activation` waits at least until then, and after
            its first connection at least its own timeout from that moment.
        first_step: The step this stage trains first (a restarted replica's step + 1): no
            activation may come for a later one before the main thread asks for it. None: any
            step until the main thread's first ask.

    Raises:
        ValueError: ``stage`` is not in 1..num_stages - 1.
    """

    def __init__(
        self,
        stage: int,
        num_stages: int,
        count_bytes: Callable[[int, int], None] | None = None,
        plan: dict[str, object] | None = None,
        *,
        first_contact_timeout_s: float = 0.0,
        first_step: int | None = None,
    ) -> None:
        if type(num_stages) is not int or type(stage) is not int or not 0 < stage < num_stages:
            raise ValueError(
                f"a stage endpoint needs a stage in 1..num_stages - 1, got stage {stage!r} "
                f"of {num_stages!r}"
            )
        self.stage = stage
        self.num_stages = num_stages
        self._count_bytes = count_bytes or (lambda sent, received: None)
        self.plan = wire_plan(plan)
        num_micro = self.plan.get(NUM_MICRO_KEY)
        self._num_micro = num_micro if type(num_micro) is int else None
        """The plan's micro-batches per batch (None: the plan does not say): a request for
        another index is refused, so no peer can make the endpoint keep a slot per index."""
        self.handlers = OpRegistry()
        self.handlers.register(
            ACTIVATION, _Connection.activation, sink_for=_Connection.activation_sink_for
        )
        self.handlers.register(GRADIENT, _Connection.gradient)
        self.handlers.register(STAGE_HELLO, _Connection.hello)
        self._changed = threading.Condition()
        """Guards everything below; notified whenever a slot changes or the endpoint closes."""
        self._latest_step: int | None = None if first_step is None else first_step - 1
        """The latest step the main thread asked for (before any: the one before the first):
        the stage before may send at most the step after it."""
        self._inbox: dict[int, _Slot] = {}
        self._inbox_buffers = MicroBuffers()
        self._outbox: dict[int, _Slot] = {}
        self._outbox_buffers = MicroBuffers()
        self._num_connections = 0
        self._first_contact_timeout_s = first_contact_timeout_s
        self._first_contact_deadline = time.monotonic() + first_contact_timeout_s
        self._first_connected_at: float | None = None
        """When the stage before first connected (None: it never has)."""
        self.peer_hosts: set[str] = set()
        """The hosts the stage before connected from."""
        self._closed = False
        self._refusal: ConfigFieldError | None = None
        """Set when the stage before said hello with another plan."""
        self._failure: str | None = None
        """Why this stage cannot train (``fail``): every request of the stage before is refused
        with it."""
        self._failure_told = False
        """Whether a request of the stage before was refused with ``_failure``."""

    def open_connection(self, peer: str) -> _Connection:
        logger.debug("stage %d: connection from %s", self.stage, peer)
        with self._changed:
            self._num_connections += 1
            if self._first_connected_at is None:
                self._first_connected_at = time.monotonic()
            self.peer_hosts.add(peer.rpartition(":")[0])
        return _Connection(self, peer)

    def _forget_connection(self) -> None:
        with self._changed:
            self._num_connections -= 1
            self._changed.notify_all()

    def _connection_hint(self) -> str:
        """Why the stage before may be silent, as far as this side can tell (lock held)."""
        if self._first_connected_at is None:
            waited = self._first_contact_timeout_s
            return f" (stage {self.stage - 1} never connected" + (
                f" within {waited:g}s of this stage's start)" if waited else ")"
            )
        if self._num_connections == 0:
            return f" (stage {self.stage - 1} closed its connections)"
        return ""

    # The stage's main thread.

    def take_activation(self, step: int, micro: int, timeout_s: float) -> torch.Tensor:
        """Wait until the inbox holds the activation of (``step``, ``micro``) and take it:
        the receive buffer holding it (a repeated take of the same step returns it again).

        Raises:
            StageTimeoutError: it did not arrive within ``timeout_s``.
            PipelineError: the slot already holds a later step, or the endpoint closed.
            ConfigFieldError: the stage before said hello with another plan (``greet``).
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            if self._latest_step is None or step > self._latest_step:
                self._latest_step = step
                self._changed.notify_all()
            while True:
                if self._refusal is not None:
                    raise self._refusal
                if self._closed:
                    raise PipelineError(
                        f"stage {self.stage}: links closed while waiting for the activation of "
                        f"step {step}, micro-batch {micro}"
                    )
                slot = self._inbox.get(micro)
                if slot is not None and slot.step > step:
                    raise PipelineError(
                        f"stage {self.stage}: asked for the activation of step {step}, "
                        f"micro-batch {micro}, but stage {self.stage - 1} already sent step "
                        f"{slot.step}: steps must be taken in order"
                    )
                if slot is not None and slot.step == step and not slot.receiving:
                    assert slot.buffer is not None
                    if not slot.taken:  # a repeated take is the same bytes
                        self._count_bytes(0, payload_bytes(slot.buffer))
                    slot.taken = True
                    return slot.buffer
                remaining_s = self._activation_deadline(deadline, timeout_s) - time.monotonic()
                if remaining_s <= 0:
                    raise StageTimeoutError(
                        f"stage {self.stage}: stage {self.stage - 1} did not send the activation "
                        f"of step {step}, micro-batch {micro} within {timeout_s:g}s"
                        f"{self._connection_hint()}"
                    )
                self._changed.wait(remaining_s)

    def _activation_deadline(self, deadline: float, timeout_s: float) -> float:
        """When a wait for an activation gives up (lock held): at ``deadline``, but not before
        the stage before has had its time to connect, nor within ``timeout_s`` of its first
        connection (a wait that began before it connected starts over then)."""
        if self._first_connected_at is None:
            return max(deadline, self._first_contact_deadline)
        return max(deadline, self._first_connected_at + timeout_s)

    def deposit_gradient(self, step: int, micro: int, grad: torch.Tensor) -> None:
        """Copy the gradient of (``step``, ``micro``) into its outbox for the stage before to
        fetch; returns at once.

        Raises:
            ValueError: ``grad``'s dtype cannot travel.
            PipelineError: the outbox still holds an unfetched gradient for ``micro``, or one of
                the same or a later step, or the endpoint closed.
        """
        dtype_name(grad.dtype)
        with self._changed:
            if self._closed:
                raise PipelineError(f"stage {self.stage}: links are closed")
            slot = self._outbox.setdefault(micro, _Slot())
            if not slot.taken:
                raise PipelineError(
                    f"stage {self.stage}: stage {self.stage - 1} has not fetched the gradient of "
                    f"step {slot.step}, micro-batch {micro} yet; cannot hold step {step} too"
                )
            if step <= slot.step:
                raise PipelineError(
                    f"stage {self.stage}: the gradient of step {step}, micro-batch {micro} comes "
                    f"after step {slot.step}: steps must increase"
                )
            buffer = self._outbox_buffers.get(micro, grad.dtype, tuple(grad.shape))
            buffer.copy_(grad.detach())
            slot.step, slot.buffer, slot.taken = step, buffer, False
            self._changed.notify_all()
        # Sent as far as this step goes: the stage before fetches it before either finishes.
        self._count_bytes(payload_bytes(buffer), 0)

    def wait_until_released(self, timeout_s: float) -> bool:
        """Wait until the stage before has fetched every gradient deposited and closed its
        connections (it is done with this stage), up to ``timeout_s``; whether it did. A stage
        that finished must not stop serving while its last gradients are still to be fetched
        or on their way."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._num_connections > 0 or not all(s.taken for s in self._outbox.values()):
                remaining_s = deadline - time.monotonic()
                if self._closed or remaining_s <= 0:
                    return False
                self._changed.wait(remaining_s)
        return True

    def fail(self, problem: str, timeout_s: float) -> bool:
        """This stage cannot train (its shards refused it, say): refuse every request of the
        stage before with ``problem`` from now on (its hello too, which it would otherwise
        retry until its first-contact bound and then report the connection, not the cause),
        and wait until one was refused so, up to ``timeout_s``; whether one was."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._failure = self._failure or problem
            self._changed.notify_all()
            while not self._failure_told and not self._closed:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                self._changed.wait(remaining_s)
            return self._failure_told

    def _check_not_failed(self) -> None:
        """Raise the stage's failure (lock held), noting that the stage before was told."""
        if self._failure is not None:
            self._failure_told = True
            self._changed.notify_all()
            raise ValueError(f"stage {self.stage} cannot train: {self._failure}")

    def close(self) -> None:
        """Wake every waiter: held fetches answer ``closed``, the main thread's waits raise."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # The server's connection threads.

    def check_sender(self, meta: dict) -> None:
        """Refuse a request that does not come from the stage before this one."""
        sender = meta.get("stage")
        if sender != self.stage - 1:
            raise ValueError(
                f"stage {self.stage} of {self.num_stages} answers stage {self.stage - 1} only, "
                f"not stage {sender!r}"
            )

    def greet(self, meta: dict, peer: str) -> dict:
        """This stage's hello, for the stage before's. When that stage's plan differs from
        this one's, the main thread's waits raise the ``ConfigFieldError`` naming the setting
        and both values from now on, and its activations are refused."""
        if meta.get("stage") != self.stage - 1:
            # Another place altogether: the caller refuses this stage on its own side.
            return self._hello()
        with self._changed:
            self._check_not_failed()
            self._check_not_under_way()
        try:
            check_plans_agree(
                placed_plan(self.num_stages, self.plan),
                placed_plan(meta.get("num_stages"), meta.get("plan")),
                f"stage {self.stage}",
                f"stage {self.stage - 1} (connecting from {peer.rpartition(':')[0]})",
            )
        except ConfigFieldError as e:
            with self._changed:
                self._refusal = self._refusal or e
                self._changed.notify_all()
        return self._hello()

    def _check_not_under_way(self) -> None:
        """Refuse the hello of a stage before that comes once this stage has already received
        activations (lock held): another process (the same stage started again, or a second
        one given the same --rank and --stage) that would start at its first step where this
        stage is far past it. Refused at the hello, it leaves the replica under way alone (its
        plan, were it another, would otherwise poison this stage's waits) and says why in one
        line, instead of a refused activation about steps that must increase."""
        received = [slot.step for slot in self._inbox.values() if slot.step >= 0]
        if received:
            before = self.stage - 1
            raise ValueError(
                f"stage {self.stage} is already training with another stage {before} (it "
                f"received the activations of step {max(received)}): a stage {before} started "
                f"again, or a second one of the same --rank and --stage {before}, cannot join a "
                "replica under way: stop the replica's other stages and start them all again, "
                "last stage first"
            )

    def _hello(self) -> dict:
        return {"stage": self.stage, "num_stages": self.num_stages, "plan": self.plan}

    def check_micro(self, micro: int) -> None:
        """Raise ValueError unless ``micro`` is one of the plan's micro-batch indices."""
        if self._num_micro is not None and micro >= self._num_micro:
            raise ValueError(
                f"micro-batch {micro} is past the plan's last ({self._num_micro - 1}): "
                f"a batch is {self._num_micro} micro-batches"
            )

    def start_receiving(self, step: int, micro: int) -> None:
        """Claim the inbox slot of ``micro`` for the activation of ``step``.

        Raises:
            ValueError: the slot still holds an activation not taken, is being received into,
                or held the same or a later step.
        """
        with self._changed:
            self._check_not_failed()
            if self._closed:
                raise ValueError(f"stage {self.stage} is closing")
            if self._refusal is not None:
                raise ValueError(f"stage {self.stage} refused its plan: {self._refusal}")
            slot = self._inbox.setdefault(micro, _Slot())
            if slot.receiving:
                raise ValueError(
                    f"stage {self.stage} is already receiving an activation for micro-batch {micro}"
                )
            if not slot.taken:
                raise ValueError(
                    f"stage {self.stage} has not taken the activation of step {slot.step}, "
                    f"micro-batch {micro} yet; refusing step {step}"
                )
            if step <= slot.step:
                raise ValueError(
                    f"the activation of step {step}, micro-batch {micro} comes after step "
                    f"{slot.step}: steps must increase"
                )
            if self._latest_step is not None and step > self._latest_step + 1:
                raise ValueError(
                    f"the activation of step {step}, micro-batch {micro} is ahead of stage "
                    f"{self.stage}, which is at step {self._latest_step}: the stage before "
                    f"may send step {self._latest_step + 1} at most"
                )
            slot.receiving = True

    def receive_buffer(
        self, micro: int, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The buffer an activation for ``micro`` is received into (its slot is claimed)."""
        return self._inbox_buffers.get(micro, dtype, shape)

    def finish_receiving(self, micro: int, step: int, tensor: torch.Tensor | None) -> None:
        """Release the slot claimed for ``micro``: holding ``tensor`` as the activation of
        ``step``, or (None) as it was, when the request failed."""
        with self._changed:
            slot = self._inbox[micro]
            slot.receiving = False
            if tensor is not None:
                slot.step, slot.buffer, slot.taken = step, tensor, False
            self._changed.notify_all()

    def fetch_gradient(self, step: int, micro: int, max_wait_s: float) -> torch.Tensor | str:
        """The gradient of (``step``, ``micro``) once deposited, waiting up to ``max_wait_s``;
        else ``"held"`` (not yet) or ``"closed"`` (the endpoint is closing).

        Raises:
            ValueError: the outbox holds a later step: that gradient is gone.
        """
        deadline = time.monotonic() + max_wait_s
        with self._changed:
            while not self._closed:
                self._check_not_failed()
                slot = self._outbox.get(micro)
                if slot is not None and slot.step > step:
                    raise ValueError(
                        f"the gradient of step {step}, micro-batch {micro} is gone: stage "
                        f"{self.stage} holds step {slot.step}"
                    )
                if slot is not None and slot.step == step:
                    buffer = slot.buffer
                    assert buffer is not None
                    slot.taken = True
                    return buffer
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return "held"
                self._changed.wait(remaining_s)
        return "closed"


class _Connection:
    """One connection from the stage before: which inbox slot it is receiving into."""

    def __init__(self, endpoint: StageEndpoint, peer: str) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self._receiving: tuple[int, int] | None = None
        """(step, micro) of the activation this connection is receiving, until answered."""

    def _release(self) -> None:
        # A request whose tensors could not be read is never handed to its handler: free its
        # slot on the connection's next request, or when the connection ends.
        if self._receiving is not None:
            self.endpoint.finish_receiving(self._receiving[1], self._receiving[0], None)
            self._receiving = None

    def close(self) -> None:
        self._release()
        self.endpoint._forget_connection()

    def activation_sink_for(self, request: Message) -> Sink:
        self._release()
        self.endpoint.check_sender(request.meta)
        step, micro = micro_batch_key(request.meta)
        self.endpoint.check_micro(micro)
        self.endpoint.start_receiving(step, micro)
        self._receiving = (step, micro)

        def sink(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            if name != ACTIVATION_NAME:
                raise ValueError(f"an activation request carries {ACTIVATION_NAME!r}, not {name!r}")
            return self.endpoint.receive_buffer(micro, dtype, shape)

        return sink

    def activation(self, request: Message) -> Message:
        assert self._receiving is not None
        step, micro = self._receiving
        if len(request.tensors) != 1:
            self._release()
            raise ValueError(
                f"an activation request carries one tensor, not {len(request.tensors)}"
            )
        self.endpoint.finish_receiving(micro, step, request.tensors[0][1])
        self._receiving = None
        return request.reply()

    def gradient(self, request: Message) -> Message:
        self.endpoint.check_sender(request.meta)
        step, micro = micro_batch_key(request.meta)
        self.endpoint.check_micro(micro)
        found = self.endpoint.fetch_gradient(step, micro, hold_of(request.meta))
        if isinstance(found, str):
            return request.reply({found: True})
        return request.reply({}, [(GRADIENT_NAME, found)])

    def hello(self, request: Message) -> Message:
        # The reply carries this stage's plan even when refusing, so that the stage before
        # names the difference from its side as well.
        return request.reply(self.endpoint.greet(request.meta, self.peer))
