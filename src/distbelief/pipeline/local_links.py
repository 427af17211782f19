"""``StageLinks`` between stages that are threads of one process: for tests, and as the
reference the wire's links must behave like.

Each boundary between stages ``b`` and ``b + 1`` has two channels, one per direction, holding
copies of the sent tensors keyed by (step, micro-batch) until the other side takes them.
"""

from __future__ import annotations

import threading

import torch

from distbelief.config import check_count
from distbelief.errors import StageTimeoutError, StageUnavailableError
from distbelief.pipeline.links import LinkCounters, StageLinks, payload_bytes


class _Closed(Exception):
    """The channel was closed by one of its ends before the awaited tensor arrived."""


class _Channel:
    """One direction across one boundary: tensors keyed by (step, micro-batch)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._items: dict[tuple[int, int], torch.Tensor] = {}
        self._closed = False

    def put(self, key: tuple[int, int], tensor: torch.Tensor) -> None:
        with self._changed:
            if self._closed:
                raise _Closed
            self._items[key] = tensor
            self._changed.notify_all()

    def take(self, key: tuple[int, int], timeout_s: float) -> torch.Tensor | None:
        """The tensor for ``key``, or None after ``timeout_s``; raises _Closed if the channel
        is closed without it."""
        with self._changed:
            self._changed.wait_for(lambda: key in self._items or self._closed, timeout_s)
            if key in self._items:
                return self._items.pop(key)
            if self._closed:
                raise _Closed
            return None

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class _LocalLinks:
    """One stage's ends of the channels to its neighbours (None where it has no neighbour)."""

    def __init__(
        self,
        stage: int,
        upstream: tuple[_Channel, _Channel] | None,
        downstream: tuple[_Channel, _Channel] | None,
    ) -> None:
        self.counters = LinkCounters()
        self._stage = stage
        # (forward, backward) channels of the boundary before and after this stage.
        self._upstream = upstream
        self._downstream = downstream
        self._closed = False

    def _side(self, side: tuple[_Channel, _Channel] | None, needs: str) -> tuple[_Channel, ...]:
        if self._closed:
            raise RuntimeError(f"links of stage {self._stage} are closed")
        if side is None:
            raise RuntimeError(f"stage {self._stage} has no stage to {needs}")
        return side

    def _send(self, channel: _Channel, peer: int, what: str, key: tuple[int, int], t) -> None:
        copy = t.detach().clone()
        try:
            channel.put(key, copy)
        except _Closed:
            raise StageUnavailableError(
                f"stage {self._stage} cannot send the {what} of step {key[0]} micro-batch "
                f"{key[1]}: stage {peer} has closed its links"
            ) from None
        self.counters.bytes_sent += payload_bytes(copy)

    def _recv(
        self, channel: _Channel, peer: int, what: str, key: tuple[int, int], timeout_s: float
    ) -> torch.Tensor:
        try:
            tensor = channel.take(key, timeout_s)
        except _Closed:
            raise StageUnavailableError(
                f"stage {self._stage} cannot receive the {what} of step {key[0]} micro-batch "
                f"{key[1]}: stage {peer} has closed its links"
            ) from None
        if tensor is None:
            raise StageTimeoutError(
                f"stage {self._stage} received no {what} of step {key[0]} micro-batch "
                f"{key[1]} from stage {peer} within {timeout_s} s"
            )
        self.counters.bytes_received += payload_bytes(tensor)
        return tensor

    def send_forward(self, step: int, micro: int, activation: torch.Tensor) -> None:
        """See ``StageLinks.send_forward``."""
        forward, _ = self._side(self._downstream, "send an activation to")
        self._send(forward, self._stage + 1, "activation", (step, micro), activation)

    def recv_forward(self, step: int, micro: int, timeout_s: float) -> torch.Tensor:
        """See ``StageLinks.recv_forward``."""
        forward, _ = self._side(self._upstream, "receive an activation from")
        return self._recv(forward, self._stage - 1, "activation", (step, micro), timeout_s)

    def send_backward(self, step: int, micro: int, grad: torch.Tensor) -> None:
        """See ``StageLinks.send_backward``."""
        _, backward = self._side(self._upstream, "send a gradient to")
        self._send(backward, self._stage - 1, "gradient", (step, micro), grad)

    def recv_backward(self, step: int, micro: int, timeout_s: float) -> torch.Tensor:
        """See ``StageLinks.recv_backward``."""
        _, backward = self._side(self._downstream, "receive a gradient from")
        return self._recv(backward, self._stage + 1, "gradient", (step, micro), timeout_s)

    def close(self) -> None:
        """Closes this stage's channels: a neighbour waiting on one raises
        StageUnavailableError; tensors already sent can still be received. Closing twice
        does nothing."""
        self._closed = True
        for side in (self._upstream, self._downstream):
            for channel in side or ():
                channel.close()


def local_links(num_stages: int) -> list[StageLinks]:
    """Links for ``num_stages`` stages running as threads of this process.

    Sends store a copy and return at once; receives wait up to their ``timeout_s`` and raise
    StageTimeoutError naming the stage, step and micro-batch. Counters count tensor payload
    bytes (``numel * element_size``).

    Args:
        num_stages: Number of stages P (>= 1).

    Returns:
        One ``StageLinks`` per stage, in stage order.

    Raises:
        ValueError: If ``num_stages`` is no integer >= 1 (a bool is none).
    """
    check_count("num_stages", num_stages)
    boundaries = [(_Channel(), _Channel()) for _ in range(num_stages - 1)]
    return [
        _LocalLinks(
            stage,
            upstream=boundaries[stage - 1] if stage > 0 else None,
            downstream=boundaries[stage] if stage < num_stages - 1 else None,
        )
        for stage in range(num_stages)
    ]
