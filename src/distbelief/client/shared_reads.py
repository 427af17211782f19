"""Pulls without a request from shards on this host: per shard, the shared parameters it
offered (``wire/shared_params.py``), asked for at the first pull and dropped once the shard
ends (a restarted shard is asked again).

A shard that cannot share (another host, a consistency model that decides when pulls are
answered, TCP only) is asked once; its pulls stay requests. Reads are counted and reported
with the next push, so the shard's pull count includes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from distbelief.wire.shared_params import SharedParamsReader
from distbelief.wire.shared_params import supported as sharing_supported

logger = logging.getLogger(__name__)

_REFUSED = object()
"""A shard that said no, or whose offer this process cannot open: not asked again."""


class SharedReads:
    """Per shard: its reader of shared parameters, None (not asked yet) or refused.

    Each shard's calls come from its lane, one at a time.
    """

    def __init__(self, slices: Sequence[Sequence[tuple[int, torch.dtype]]]) -> None:
        self._slices = [list(pieces) for pieces in slices]
        refused = sharing_supported()
        self._readers: list = [_REFUSED if refused else None for _ in self._slices]
        self._unreported = [0] * len(self._slices)

    def read(self, shard_id: int, outs: Sequence[torch.Tensor], ask: Callable[[], dict]):
        """Copy shard ``shard_id``'s parameters into ``outs`` from shared memory; their
        version, or None (pull instead). ``ask`` sends the SHARE request, returns its reply."""
        reader = self._readers[shard_id]
        if reader is _REFUSED:
            return None
        if reader is None:
            reader = self._readers[shard_id] = self._open(shard_id, ask())
            if reader is _REFUSED:
                return None
        version = reader.read_into(outs)
        if version is None:
            if not reader.usable:  # the shard ended or moved its parameters: ask anew
                reader.close()
                self._readers[shard_id] = None
            return None
        self._unreported[shard_id] += 1
        return version

    def _open(self, shard_id: int, offer: dict):
        if not offer.get("shared"):
            logger.debug("shard %d pulls by request: %s", shard_id, offer.get("why"))
            return _REFUSED
        try:
            reader = SharedParamsReader.open(offer, self._slices[shard_id])
        except (OSError, ValueError) as e:
            logger.info("shard %d: its shared parameters cannot be read here (%s)", shard_id, e)
            return _REFUSED
        logger.debug("shard %d: reading its parameters from shared memory", shard_id)
        return reader

    def take_count(self, shard_id: int) -> int:
        """Reads of shard ``shard_id`` since the last call (reported with a push)."""
        count, self._unreported[shard_id] = self._unreported[shard_id], 0
        return count

    def close(self) -> None:
        for shard_id, reader in enumerate(self._readers):
            if isinstance(reader, SharedParamsReader):
                reader.close()
                self._readers[shard_id] = None
