"""The push and pull pipeline of DownpourSGD: sending the accrued gradient to the shards,
fetching their parameters into the model, and taking in the replies, overlapped with compute
or waited for. A mixin of DownpourSGD: it holds no state of its own and decides no schedule
(``step()`` says when to push and pull).
"""

from __future__ import annotations

import torch

from distbelief.client.compression import EncodedPush


class PushPullPipeline:
    """Pushes and pulls of a DownpourSGD, on the attributes its constructor sets: ``client``,
    ``_copies``, ``_accrued``, ``_outbox``, ``_inbox``, ``_compressor``, the futures in flight
    and the versions and steps they bring; and on its ``_layout_changed()``."""

    def _push_accrued(self, now: bool = False, whole: bool = False) -> None:
        """Push the accrued gradient; ``now``: wait for the shards to apply it; ``whole``: all
        of it at full width, even when pushes are compressed."""
        # The outbox is sent without a copy, so the previous push must be done before reuse.
        self._finish_push_if_done(block=True)
        if self._closed:
            return  # on_push_applied closed the optimizer: its close pushed what was accrued
        self._copies.claim_accrued()
        self._drop_held_slices()
        if self._compressor is None or whole:
            payload, ready = self._outbox, self._copies.move_out(self._outbox, self._accrued)
        else:
            encoded = self._compressor.encode(self._accrued)  # leaves the rest accrued
            shard_tensors, ready = self._copies.to_host(encoded.shard_tensors)
            payload = EncodedPush(shard_tensors, encoded.meta)
        base = self._window_base if self._window_base is not None else self._model_versions
        self._window_base = None
        push = self.client.push_now if now else self.client.push
        futures = push(payload, clock=self.num_steps, base_versions=base, ready=ready)
        if now:
            self._note_applied(self.num_steps)
        else:
            self._push_futures, self._in_flight_step = futures, self.num_steps

    def _drop_held_slices(self) -> None:
        """Zero the accrued slices of the shards that hold this step from the previous life:
        the push leaves them out, and neither it nor a later push may carry what they hold
        (a compressed push's left-over included)."""
        for shard_id in range(self.client.num_shards):
            if self.client.holds(shard_id, self.num_steps):
                for piece in self.client.slices[shard_id]:
                    self._accrued[piece.dtype][piece.start : piece.stop].zero_()

    def _finish_push_if_done(self, block: bool = False) -> None:
        """Take in the replies to the push in flight once every shard has answered (``block``:
        wait for them): its step is then applied."""
        if not self._push_futures:
            return
        if not block and not all(future.done() for future in self._push_futures):
            return
        self.client.wait(self._push_futures)
        self._push_futures = []
        self._note_applied(self._in_flight_step)

    def _note_applied(self, step: int) -> None:
        """Every shard has applied the push of ``step``: tell ``on_push_applied``."""
        if step <= self.applied_step:
            return  # a flush with nothing accrued pushes no newer step
        self.applied_step = step
        if self._on_push_applied is not None:
            self._on_push_applied(step)

    def _start_pull(self, after_versions: list[int] | None = None) -> None:
        if self._pull_futures:
            self._finish_pull_if_done(block=True)
        self._pull_futures = self.client.pull(
            self._inbox,
            clock=self.num_steps,
            after_versions=after_versions,
            ready=self._copies.inbox_free(),
        )

    def _finish_pull_if_done(self, block: bool = False, load: bool = True) -> None:
        """Takes in the pull in flight once answered (``block``: waits for it), loading its
        parameters into the model unless ``load`` is False."""
        if not self._pull_futures:
            return
        if not block and not all(future.done() for future in self._pull_futures):
            return
        # A held pull (SSP, sync) may legitimately take up to hold_timeout_s.
        try:
            self._model_versions = self.client.wait(
                self._pull_futures, timeout_s=self.client.hold_timeout_s + self.client.timeout_s
            )
        except BaseException:
            if all(future.done() for future in self._pull_futures):
                # A failed pull is told once: the close after a HeldTooLongError pushes what
                # was accrued instead of raising it again. One still in flight is kept: the
                # next pull waits for it, writing into the same buffers.
                self._pull_futures = []
            raise
        self._pull_futures = []
        if load:
            self._load_inbox()

    def _load_inbox(self) -> None:
        """Copy the pulled parameters into the model, on its device (on a GPU: queued; the
        next pull waits for the copy before it refills the inbox)."""
        self._copies.load(self._params, self._inbox_views)

    @torch.no_grad()
    def pull_now(self) -> None:
        """Fetch the shards' parameters and load them into the model, waiting for the answer.

        Raises:
            ClosedError: called after ``close()``.
            ValueError: a parameter's shape, dtype or device changed since the constructor.
        """
        self._check_open("pull_now")
        self._check_unchanged()
        self._finish_pull_if_done(block=True)
        self._model_versions = self.client.pull_now(
            self._inbox,
            clock=self.num_steps,
            timeout_s=self.client.hold_timeout_s + self.client.timeout_s,
            ready=self._copies.inbox_free(),
        )
        self._load_inbox()

    @torch.no_grad()
    def flush(self) -> None:
        """Push any accrued gradient not yet sent (all of it, at full width) and wait until
        every push is applied, and a pull still in flight is answered (its parameters are
        loaded, as the next step would load them): no request is left in flight, so the wire
        figures taken next count every byte moved.

        Raises:
            ShardTimeoutError / ShardUnavailableError / RemoteError: the push, or the pull in
                flight, failed.
            ClosedError: called after ``close()`` (which flushed already).
        """
        self._check_open("flush")
        self._copies.claim_accrued()
        self._drop_held_slices()
        if any(bool(accrued.any()) for accrued in self._accrued.values()):
            self._push_accrued(whole=True)
        self._finish_push_if_done(block=True)
        if self._closed:
            return  # on_push_applied closed the optimizer, which flushed
        # A model changed since the constructor, which step() and pull_now() refuse before
        # they load anything, takes no pulled values (they no longer fit it): the close()
        # after such a refusal still pushes what was accrued.
        self._finish_pull_if_done(block=True, load=not self._layout_changed())
