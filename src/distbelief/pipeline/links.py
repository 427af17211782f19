"""What a pipeline stage's main thread needs of its neighbours: send and receive the
activations and gradients of each micro-batch, keyed by (step, micro-batch). Implementations:
threads in one process (``local_links.py``, for tests and references) and the project's own
wire (``wire_links.py``). Nothing here moves bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(slots=True)
class LinkCounters:
    """Tensor payload bytes a stage's links moved (headers and metadata not counted)."""

    bytes_sent: int = 0
    bytes_received: int = 0


def payload_bytes(tensor: torch.Tensor) -> int:
    """The bytes of ``tensor``'s values, as the counters count them."""
    return tensor.numel() * tensor.element_size()


class StageLinks(Protocol):
    """One stage's connections to the stage before it (upstream) and the one after it
    (downstream). Stage 0 has no upstream, the last stage no downstream: calling a method that
    needs the missing side raises RuntimeError.

    Every wait is bounded by ``timeout_s`` and raises StageTimeoutError; a neighbour that cannot
    be reached raises StageUnavailableError (both ``distbelief.errors.PipelineError``).
    """

    counters: LinkCounters

    def send_forward(self, step: int, micro: int, activation: torch.Tensor) -> None:
        """Hand micro-batch ``micro``'s output activation of step ``step`` to the next stage
        (returns once it holds a copy)."""

    def recv_forward(self, step: int, micro: int, timeout_s: float) -> torch.Tensor:
        """The previous stage's output activation for (``step``, ``micro``). The tensor is a
        receive buffer the link reuses for the same micro-batch of a later step: the caller is
        done with it once it has sent that micro-batch's gradient back."""

    def send_backward(self, step: int, micro: int, grad: torch.Tensor) -> None:
        """Hand the gradient of the loss with respect to this stage's input activation for
        (``step``, ``micro``) to the previous stage (returns once the link holds a copy)."""

    def recv_backward(self, step: int, micro: int, timeout_s: float) -> torch.Tensor:
        """The next stage's gradient with respect to this stage's output for (``step``,
        ``micro``) (a reused receive buffer, as in ``recv_forward``)."""

    def close(self) -> None:
        """Release sockets and threads; a later call raises."""
