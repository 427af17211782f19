"""How a DownpourSGD ends: ``close()`` (flushing, then closing its connections and telling a
ParameterServer this rank has finished), the ``with`` block, the close at exit, and the refusal
of calls after it. A mixin of DownpourSGD: it pushes and pulls only through ``flush()``.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable
from typing import Self

from distbelief.errors import ClosedError, PSError, RendezvousError
from distbelief.wire.process_group import (
    DEFAULT_STORE_TIMEOUT_S,
    GroupStore,
    process_group_active,
)

logger = logging.getLogger(__name__)

INTERRUPTED_STORE_TIMEOUT_S = 5.0
"""How long a close on Ctrl-C tries to reach the process group's store to say this rank
finished: an up store answers in milliseconds, and one whose rank is gone (killed with the
ParameterServer it ran) would keep the interrupted script waiting the usual 30 s."""


def flush_then_close(flush: Callable[[], object] | None, close: Callable[[bool], None]) -> None:
    """Runs ``flush`` (None: nothing more is pushed), then ``close(interrupted)`` however the
    flush ended: ``interrupted`` without a flush, or when Ctrl-C cut it short (no more waiting
    for the shards). How a DownpourSGD and a ShardedEmbeddings end."""
    interrupted = flush is None
    try:
        if flush is not None:
            flush()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        close(interrupted)


class ClosingOptimizer:
    """``close()`` and what calls it, on the attributes DownpourSGD's constructor sets:
    ``client``, ``_closed``, ``_closing``, ``_server`` and ``_store`` (the ParameterServer found
    through a process group, if any)."""

    def close(self) -> None:
        """Flush, then close the connections to the shards (and, found through a process
        group, tell the ParameterServer this rank has finished). Closing twice does nothing.

        After a push or pull raised because a shard stayed unreachable past
        ``retry_timeout_s``, close sends nothing more: it closes the connections at once
        rather than wait that long again.

        Raises:
            ShardTimeoutError / ShardUnavailableError / RemoteError: the last push, or a pull
                still in flight, failed.
            RendezvousError: the process group's store could not be written.
        """
        self._close(flush=True)

    def _close(self, *, flush: bool) -> None:
        """``close()``; without ``flush``, at once: nothing more is pushed, and requests still
        retrying a shard that is down stop retrying (a ParameterServer is still told that this
        rank has finished, as ``close()`` tells it)."""
        if self._closed or self._closing:
            return
        self._closing = True
        if self._server is not None:
            atexit.unregister(self._close_at_exit)

        def close(interrupted: bool) -> None:
            # A flush that found the shards gone already waited out the retries; so did the
            # step that found it before. Queued requests then stop retrying, and a server that
            # is gone needs no word that this rank finished (its store may be gone with it).
            gone = self.client.unreachable
            self._closed = True
            try:
                if self._server is not None and not gone:
                    self._mark_finished(quietly=interrupted)
            finally:
                self.client.close(wait=not (gone or interrupted))
                # The last references to a shared outbox: its mapping goes now, not when this
                # optimizer is collected (a script goes on evaluating or saving after close).
                self._outbox, self._push_futures = {}, []

        flush_then_close(self.flush if flush and not self.client.unreachable else None, close)

    def _mark_finished(self, *, quietly: bool) -> None:
        """Tell the ParameterServer this rank has finished; ``quietly`` (on Ctrl-C), a store
        that cannot be written is logged, not raised in place of the interrupt."""
        timeout_s = INTERRUPTED_STORE_TIMEOUT_S if quietly else DEFAULT_STORE_TIMEOUT_S
        try:
            self._finished_store(timeout_s).mark_finished(self._server.session)
        except RendezvousError as e:
            if not quietly:
                raise
            logger.warning("DownpourSGD could not tell the ParameterServer it finished: %s", e)

    def _finished_store(self, timeout_s: float) -> GroupStore:
        """A fresh connection to the group's store while the group is up (the constructor's
        may have sat idle through the whole training); once the script has destroyed the group
        (before close(), or before an exit that leaves close() to atexit), the constructor's:
        a connection of its own to the store outlives the group."""
        if process_group_active() or self._store is None:
            return GroupStore(timeout_s)
        return self._store

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        """``close()``: ``with DownpourSGD(...) as x:`` closes it however the block ends. A
        block ended by Ctrl-C (``KeyboardInterrupt``) closes at once instead, pushing nothing
        more: its flush would wait up to ``retry_timeout_s`` for a shard that is down, and
        then raise in place of the interrupt."""
        self._close(flush=exc_type is None or not issubclass(exc_type, KeyboardInterrupt))

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise ClosedError("DownpourSGD", action)

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except (PSError, RendezvousError) as e:
            logger.warning("DownpourSGD could not finish cleanly at exit: %s", e)
