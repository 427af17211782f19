"""Event links between the launcher and processes that another engine started, possibly on
other hosts: the launcher listens on TCP; each process connects once, both prove they hold the
job key (the wire's mutual HMAC handshake, bounded in time), the process names itself, then
sends its events as a local child does over its pipe, and reads "stop". Knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from distbelief.errors import ProtocolError
from distbelief.launch.child import EventInbox
from distbelief.wire.security import accept_peer, authenticate_to_server

HANDSHAKE_TIMEOUT_S = 15.0
"""Longest a new link may take to authenticate and name its process."""
STOP = "stop"
"""What the launcher sends down a link to ask its process to finish."""
LINK_IO_TIMEOUT_S = 30.0
"""Longest the launcher waits for the rest of an event whose first bytes came (or to hand
"stop" to the kernel): a process whose host vanished mid-event is then a closed link, not a
launcher blocked for good. It reads a link only once bytes are there, so an idle one is never
cut."""


class EventListener:
    """The launcher's end: accepts links (each handshake on a thread of its own, so a slow or
    hostile peer holds up no other), and reads every link's events.

    Args:
        host: the address to listen on (one the processes can reach).
        key: the job key a process must prove it holds.
    """

    def __init__(self, host: str, key: bytes) -> None:
        self._key = key
        self._server = socket.create_server((host, 0))
        self.address: tuple[str, int] = (host, self._server.getsockname()[1])
        self._opened: queue.SimpleQueue[tuple[str, dict, Connection]] = queue.SimpleQueue()
        self._links: dict[str, Connection] = {}
        self._serials: dict[Connection, tuple[str, int]] = {}
        self._inbox = EventInbox(on_closed=self._closed)
        threading.Thread(target=self._accept, name="event-listener", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:  # closed: the job is over
                return
            threading.Thread(target=self._open, args=(sock,), daemon=True).start()

    def _open(self, sock: socket.socket) -> None:
        try:
            accept_peer(sock, self._key, HANDSHAKE_TIMEOUT_S)
            sock.settimeout(None)  # blocking again: Connection reads the raw descriptor
            _bound_blocking_io(sock, LINK_IO_TIMEOUT_S)
            link = Connection(sock.detach())
        except (OSError, ProtocolError):
            sock.close()
            return
        try:
            if not link.poll(HANDSHAKE_TIMEOUT_S):
                raise TimeoutError("no hello")
            name, info = link.recv()
        except (OSError, EOFError, ValueError, TypeError):
            link.close()
            return
        self._opened.put((name, info, link))

    def get(self, timeout_s: float) -> tuple | None:
        """The next event ``(kind, name, payload)``, waiting up to ``timeout_s``. A link just
        opened reads as ``("hello", name, info)``: the process's pid and node, and ``link``, a
        serial number; a link that closed (its process is gone), after its last event, as
        ``("closed", name, serial)``."""
        with contextlib.suppress(queue.Empty):
            name, info, link = self._opened.get_nowait()
            self._links[name] = link
            self._serials[link] = (name, len(self._serials))
            self._inbox.add(link)
            return ("hello", name, {**info, "link": self._serials[link][1]})
        # Short waits: a link opened meanwhile is taken in at the next call.
        return self._inbox.get(min(timeout_s, 0.05))

    def _closed(self, link: Connection) -> tuple:
        name, serial = self._serials[link]
        if self._links.get(name) is link:
            del self._links[name]
        return ("closed", name, serial)

    def linked(self, name: str) -> bool:
        """Whether process ``name`` has a link open (its end closes when the process ends)."""
        return name in self._links

    def send_stop(self, name: str) -> None:
        """Asks process ``name`` to finish (nothing if its link is gone)."""
        link = self._links.get(name)
        if link is None:
            return
        try:
            link.send(STOP)
        except OSError:
            # Gone, or the send timed out partway: the link's framing is lost. Shut down, not
            # closed (the inbox still waits on its descriptor): both ends then read it closed.
            with (
                contextlib.suppress(OSError),
                socket.fromfd(link.fileno(), socket.AF_INET, socket.SOCK_STREAM) as duplicate,
            ):
                duplicate.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stops listening and closes every link (a process still running sees EOF)."""
        self._server.close()
        for link in self._links.values():
            with contextlib.suppress(OSError):
                link.close()
        self._links.clear()


def _bound_blocking_io(sock: socket.socket, timeout_s: float) -> None:
    """Bound each blocking read and write on ``sock``'s descriptor (a ``Connection``'s, which
    knows no timeout) by ``timeout_s``: one that waits longer fails with an OSError."""
    seconds = int(timeout_s)
    bound = struct.pack("ll", seconds, int((timeout_s - seconds) * 1_000_000))
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, option, bound)


def connect_events(
    address: tuple[str, int], key: bytes, name: str, info: dict[str, Any]
) -> Connection:
    """The process's end: connects to the launcher, authenticates, names itself.

    Raises:
        OSError / TimeoutError: the launcher cannot be reached within the handshake timeout.
        ProtocolError: the launcher does not hold the job key.
    """
    sock = socket.create_connection(address, timeout=HANDSHAKE_TIMEOUT_S)
    try:
        authenticate_to_server(sock, key, HANDSHAKE_TIMEOUT_S)
        sock.settimeout(None)
        link = Connection(sock.detach())
    except BaseException:
        sock.close()
        raise
    link.send((name, info))
    return link


def watch_stop(link: Connection, stop: threading.Event, orphan_grace_s: float) -> None:
    """Sets ``stop`` when the launcher says so; exits the process ``orphan_grace_s`` after the
    launcher is gone (its end of the link closed), as a local child does when its lifeline
    breaks. The grace leaves an engine that stops its processes itself the time to do so."""
    with contextlib.suppress(EOFError, OSError):
        while True:
            if link.recv() == STOP:
                stop.set()
    time.sleep(orphan_grace_s)
    os._exit(3)
