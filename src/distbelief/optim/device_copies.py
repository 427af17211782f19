"""Copies between a replica's device and the host buffers the wire reads and writes.

On a CUDA device, gradients go to pinned host memory on a side stream and pulled parameters come
back with non-blocking copies, each followed by an event: ``step()`` only queues them, and the
thread that sends a push (or refills the inbox) waits for the event instead. On the CPU the same
calls are plain copies and there is nothing to wait for. Knows nothing of shards or messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Ready = Callable[[], object]
"""Blocks until the copies it stands for are done."""


class DeviceCopies:
    """The copies of one optimizer whose parameters live on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._accrued_read: torch.cuda.Event | None = None
        self._inbox_read: torch.cuda.Event | None = None
        self._pinned: dict[str, torch.Tensor] = {}

    def host_zeros(self, sizes: dict[torch.dtype, int]) -> dict[torch.dtype, torch.Tensor]:
        """Flat host buffers by dtype (pinned for a CUDA device: copies run at full speed
        and asynchronously)."""
        return {
            dtype: torch.zeros(total, dtype=dtype, pin_memory=self.is_cuda)
            for dtype, total in sizes.items()
        }

    def move_out(
        self, outbox: dict[torch.dtype, torch.Tensor], accrued: dict[torch.dtype, torch.Tensor]
    ) -> Ready | None:
        """Copy ``accrued`` into ``outbox`` and zero it; the result waits for the copy.

        On CUDA both run on the side stream after the work already queued; the next use of
        ``accrued`` must come after :meth:`claim_accrued`.
        """
        if self._stream is None:
            for dtype, values in accrued.items():
                outbox[dtype].copy_(values)
                values.zero_()
            return None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for dtype, values in accrued.items():
                outbox[dtype].copy_(values, non_blocking=True)
                values.zero_()
            self._accrued_read = self._stream.record_event()
        return self._accrued_read.synchronize

    def to_host(
        self, shard_tensors: Sequence[list[tuple[str, torch.Tensor]]]
    ) -> tuple[list, Ready | None]:
        """Host copies of (name, tensor) pairs made on the device (a compressed push), in
        pinned buffers reused per name; and what waits for them. Host tensors pass as they are.

        The previous result's buffers must no longer be in use (its push is done).
        """
        if self._stream is None:
            return [list(tensors) for tensors in shard_tensors], None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        copied = []
        with torch.cuda.stream(self._stream):
            for tensors in shard_tensors:
                copied.append([(name, self._copy_to_pinned(name, t)) for name, t in tensors])
            event = self._stream.record_event()
        return copied, event.synchronize

    def _copy_to_pinned(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        host = self._pinned.get(name)
        if host is None or host.dtype != tensor.dtype or host.shape != tensor.shape:
            host = self._pinned[name] = torch.empty(
                tensor.shape, dtype=tensor.dtype, pin_memory=True
            )
        host.copy_(tensor, non_blocking=True)
        # Made on the main stream, read here: its memory must not be reused before the copy.
        tensor.record_stream(self._stream)
        return host

    def claim_accrued(self) -> None:
        """Order the next use of the accrued buffer after :meth:`move_out`'s copy and zeroing
        (on the device: the CPU does not wait)."""
        if self._accrued_read is not None:
            torch.cuda.current_stream(self.device).wait_event(self._accrued_read)
            self._accrued_read = None

    def load(self, params: Sequence[torch.Tensor], inbox_views: Sequence[torch.Tensor]) -> None:
        """Copy pulled parameters from the host inbox into ``params``: on CUDA queued on the
        current stream (after the kernels that still read the old values, before the next
        ones), without waiting; :meth:`inbox_free` waits for it."""
        if not self.is_cuda:
            torch._foreach_copy_(list(params), list(inbox_views))
            return
        torch._foreach_copy_(list(params), list(inbox_views), non_blocking=True)
        self._inbox_read = torch.cuda.current_stream(self.device).record_event()

    def inbox_free(self) -> Ready | None:
        """What waits until the inbox may be overwritten (None: it may now)."""
        event = self._inbox_read
        return None if event is None else event.synchronize
