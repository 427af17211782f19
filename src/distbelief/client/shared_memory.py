"""Shards on this host, through shared memory (``wire/shared_params.py``): per shard, the
parameters it shares, read without a request; and this client's push buffers, which the
shard applies gradients from, so that no gradient byte crosses a socket.

Each shard whose connection is a shared-memory channel (so within the listener's cap of such
connections) is asked once (the SHARE op, at the first push or pull), with the push buffers
offered in the request; the reply says whether the shard shares its parameters and whether
it mapped the buffers. What it agreed to holds for as long as that connection: once the
shard has closed it (it stopped, or ended) or the client has opened another, nothing shared
is used, and the shard is asked again (a restarted shard answers); its parameters are let go
as soon as a request finds the connection lost, while it is retried. A shard
that cannot share (another host, a consistency model that decides when pulls are answered,
TCP only) is asked once; its pulls or pushes stay requests. Reads are counted and reported
with the next push, so the shard's pull count includes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from distbelief.wire.shared_params import SharedParamsReader, SharedTensors
from distbelief.wire.shared_params import supported as sharing_supported

logger = logging.getLogger(__name__)

Ask = Callable[[dict | None], dict]
"""Sends one shard the SHARE request (with this client's push-buffer offer, or None) and
returns the reply's metadata."""


class _Shard:
    """What one shard agreed to: its parameters' reader, and which of our memory files it
    maps (by token: an outbox, or push buffers of its own)."""

    __slots__ = ("buffers", "channel", "mapped", "reader", "refused")

    def __init__(self, channel) -> None:
        self.channel = channel
        """The connection it was agreed on."""
        self.reader: SharedParamsReader | None = None
        self.buffers: SharedTensors | None = None
        """Push buffers for this shard's slices, made at the first push from other memory."""
        self.mapped: set[int] = set()
        self.refused = False
        """The shard could not map our memory: pushes to it carry their tensors."""

    def release(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.buffers is not None:
            self.buffers.retire()


class SharedMemory:
    """Per shard: None (not asked yet) or what it agreed to. Each shard's calls come from its
    lane, one at a time.

    Args:
        slices: Per shard, (numel, dtype) of each of its slices.
        reads: Whether pulls may read shared parameters (not when they must go through the
            shard: narrowed, or changes only).
        channel_of: Shard i's connection now if it is a shared-memory channel, else None.
    """

    def __init__(
        self,
        slices: Sequence[Sequence[tuple[int, torch.dtype]]],
        *,
        reads: bool,
        channel_of: Callable[[int], object | None],
    ) -> None:
        self._slices = [list(pieces) for pieces in slices]
        self._channel_of = channel_of
        self._reads = reads
        unsupported = sharing_supported()
        self._usable = unsupported is None
        if unsupported is not None:
            logger.debug("pulls and pushes by request: %s", unsupported)
        self._said_tcp = [False] * len(self._slices)
        """Per shard: whether the debug log said its pulls and pushes go by request on TCP."""
        self._shards: list[_Shard | None] = [None] * len(self._slices)
        self._unreported = [0] * len(self._slices)
        self._outboxes: list[SharedTensors] = []
        """Flat buffers in shared memory (``outbox``): a push from them is placed as it lies."""

    def outbox(self, sizes: dict[torch.dtype, int]) -> dict[torch.dtype, torch.Tensor] | None:
        """Zeroed flat buffers by dtype, in shared memory: a push of their slices to a shard
        that maps this client's memory is placed without a copy (the shard applies it where it
        lies). None where shared memory cannot be used."""
        if not self._usable:
            return None
        dtypes = list(sizes)
        try:
            shared = SharedTensors(
                [torch.zeros(sizes[dtype], dtype=dtype) for dtype in dtypes], name="push-buffers"
            )
        except OSError as e:
            logger.info("no memory for a shared outbox (%s)", e)
            return None
        self._outboxes.append(shared)
        return dict(zip(dtypes, shared.tensors, strict=True))

    def _agreed(self, shard_id: int, ask: Ask, offer: dict | None = None) -> _Shard | None:
        """What shard ``shard_id`` agreed to, asked now if not yet (or if it has ended)."""
        if not self._usable:
            return None
        shard, channel = self._shards[shard_id], self._channel_of(shard_id)
        if shard is not None and (
            shard.channel is not channel
            or channel.peer_closed()
            or (shard.reader is not None and not shard.reader.usable)
        ):
            # The shard stopped or ended, the connection was replaced, or the parameters
            # moved: nothing agreed on that connection holds. Ask anew (on the next request's
            # connection, if this one is gone).
            shard.release()
            shard = self._shards[shard_id] = None
        if shard is None and channel is not None and not channel.peer_closed():
            shard = self._shards[shard_id] = self._ask(shard_id, channel, ask, offer)
        elif channel is None and not self._said_tcp[shard_id]:
            self._said_tcp[shard_id] = True
            logger.debug(
                "shard %d: reads and pushes by request (its connection is TCP, not shared memory)",
                shard_id,
            )
        return shard

    def _ask(self, shard_id: int, channel, ask: Ask, offer: dict | None) -> _Shard:
        shard = _Shard(channel)
        pieces = self._slices[shard_id]
        reply = ask(offer)
        if offer is not None:
            self._note_placed(shard, offer, reply)
        if self._reads and reply.get("shared"):
            try:
                shard.reader = SharedParamsReader.open(reply, pieces)
            except (OSError, ValueError) as e:
                logger.info("shard %d: its shared parameters cannot be read here (%s)", shard_id, e)
        if shard.reader:
            how = "shared"
        elif not self._reads:  # the shard shares them, but this client's pulls cannot read them
            how = "by request (this client's pulls are narrowed or changes only)"
        else:
            how = f"by request ({reply.get('why') or 'the shard shares no parameters'})"
        logger.debug("shard %d: reads %s", shard_id, how)
        return shard

    @staticmethod
    def _note_placed(shard: _Shard, offer: dict, reply: dict) -> None:
        if reply.get("placed"):
            shard.mapped.add(offer["token"])
        else:
            shard.refused = True
            logger.debug("pushes by request: %s", reply.get("placed_why"))

    def read(self, shard_id: int, outs: Sequence[torch.Tensor], ask: Ask) -> int | None:
        """Copy shard ``shard_id``'s parameters into ``outs`` from shared memory; their
        version, or None (pull by request)."""
        if not self._reads:
            return None
        shard = self._agreed(shard_id, ask)
        if shard is None or shard.reader is None:
            return None
        version = shard.reader.read_into(outs)
        if version is not None:
            self._unreported[shard_id] += 1
        return version

    def place(self, shard_id: int, grads: Sequence[torch.Tensor], ask: Ask) -> dict | None:
        """Where shard ``shard_id`` finds a push's ``grads`` in memory it maps: the offer to
        send in the push's metadata (the grads copied into push buffers first unless they lie
        in an outbox), or None (send the tensors)."""
        offer = next(
            (o for o in (box.offer_of(grads) for box in self._outboxes) if o is not None), None
        )
        shard = self._agreed(shard_id, ask, offer)
        if shard is None or shard.refused:
            return None
        if offer is None:
            if shard.buffers is None:
                pieces = self._slices[shard_id]
                try:
                    shard.buffers = SharedTensors(
                        [torch.empty(n, dtype=dtype) for n, dtype in pieces], name="push-buffers"
                    )
                except OSError as e:
                    logger.info("shard %d: no memory for push buffers (%s)", shard_id, e)
                    shard.refused = True
                    return None
            torch._foreach_copy_(shard.buffers.tensors, list(grads))
            offer = shard.buffers.offer()
        if offer["token"] not in shard.mapped:
            # First push from this memory: the shard says whether it can map it.
            self._note_placed(shard, offer, ask(offer))
            if shard.refused:
                return None
        return offer

    def connection_lost(self, shard_id: int) -> None:
        """Shard ``shard_id``'s connection failed: its parameters are let go now (a dead
        shard's memory is freed while its requests are retried), and mapped afresh from
        whichever shard answers next. This client's push buffers stay: a placed push in
        flight is retried from them."""
        shard = self._shards[shard_id]
        if shard is not None and shard.reader is not None:
            shard.reader.close()

    def take_count(self, shard_id: int) -> int:
        """Reads of shard ``shard_id`` since the last call (reported with a push)."""
        count, self._unreported[shard_id] = self._unreported[shard_id], 0
        return count

    def close(self) -> None:
        for shard_id, shard in enumerate(self._shards):
            if shard is not None:
                shard.release()
            self._shards[shard_id] = None
        for outbox in self._outboxes:
            outbox.retire()
        self._outboxes = []
