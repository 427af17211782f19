"""A client closed with requests queued to a shard that does not answer: ``close()`` returns
within its bound, and nothing of the client talks to the shards afterwards."""

from __future__ import annotations

import socket
import threading
import time

from distbelief.client.lanes import STOP_WAIT_S, ShardLanes
from distbelief.wire import Message, ops


def test_close_that_outlasts_its_queued_requests_cancels_them_and_dials_no_more():
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = silent.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    lanes = ShardLanes(
        [f"tcp://127.0.0.1:{silent.getsockname()[1]}"],
        timeout_s=1.0,
        connect_timeout_s=1.0,
        retry_timeout_s=1.0,
    )
    try:
        # Each request alone takes its timeout and retries: twenty outlast close()'s bound.
        stats = Message(ops.STATS, {})
        futures = [lanes._submit(0, lanes._request, stats, None) for _ in range(20)]
        started = time.monotonic()
        lanes.close(wait=True)
        assert time.monotonic() - started < 1.0 + 1.0 + 5.0 + STOP_WAIT_S + 10.0
        assert all(future.done() for future in futures)
        assert any(future.cancelled() for future in futures)
        # Counted once the accepting thread has caught up (on a busy machine it may stamp a
        # connection made before close() returned a moment later): none is made after.
        time.sleep(1.0)
        counted = len(accepted)
        time.sleep(3.0)
        assert len(accepted) == counted
    finally:
        silent.close()
        for connection in accepted:
            connection.close()
