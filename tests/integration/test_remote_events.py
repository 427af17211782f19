"""Event links on loopback, in one process (threads play the remote processes): a process
names itself, its events arrive in order, "stop" reaches it, its end closing is reported after
its last event; a peer without the job key, or one that never speaks, is kept out without
holding up the others."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from distbelief.errors import ProtocolError
from distbelief.launch import remote_events
from distbelief.launch.remote_events import EventListener, connect_events
from distbelief.wire.security import generate_key


def _next(listener: EventListener, timeout_s: float = 10.0) -> tuple:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = listener.get(0.05)
        if event is not None:
            return event
    raise AssertionError("no event")


def test_events_stop_and_close_travel_in_order():
    key = generate_key()
    listener = EventListener("127.0.0.1", key)
    try:
        # A peer that connects and never answers the challenge holds up no one.
        silent = socket.create_connection(listener.address, timeout=5)
        link = connect_events(listener.address, key, "worker3", {"pid": 42})
        kind, name, info = _next(listener)
        assert (kind, name, info["pid"]) == ("hello", "worker3", 42)
        for step in range(3):
            link.send(("metric", "worker3", {"step": step}))
        listener.send_stop("worker3")
        assert link.poll(5) and link.recv() == "stop"
        steps = [_next(listener)[2]["step"] for _ in range(3)]
        assert steps == [0, 1, 2]
        link.send(("done", "worker3", {"steps": 3}))
        link.close()
        assert _next(listener)[0] == "done"
        assert _next(listener) == ("closed", "worker3", info["link"])
        silent.close()
    finally:
        listener.close()


def test_a_peer_without_the_job_key_is_refused():
    listener = EventListener("127.0.0.1", generate_key())
    try:
        with pytest.raises(ProtocolError):
            connect_events(listener.address, generate_key(), "shard0", {})
        assert listener.get(0.2) is None
    finally:
        listener.close()


def test_an_event_cut_short_by_a_vanished_host_closes_its_link(monkeypatch):
    """A process's host gone in the middle of an event: the rest never comes and the link
    does not close (no FIN from a host that is gone). The launcher read it forever."""
    monkeypatch.setattr(remote_events, "LINK_IO_TIMEOUT_S", 1.0)
    key = generate_key()
    listener = EventListener("127.0.0.1", key)
    try:
        link = connect_events(listener.address, key, "worker0", {"pid": 42})
        hello = _next(listener)
        # 10 bytes of an event of 1000, and nothing more.
        os.write(link.fileno(), struct.pack("!i", 1000) + b"x" * 10)
        events: list = []
        reader = threading.Thread(target=lambda: events.append(_next(listener, 60)), daemon=True)
        reader.start()
        reader.join(60)
        assert events == [("closed", "worker0", hello[2]["link"])]
        link.close()
    finally:
        listener.close()


def test_a_stop_that_cannot_be_sent_shuts_the_link(monkeypatch):
    """A send of "stop" that failed partway left a link whose framing was lost in use."""
    key = generate_key()
    listener = EventListener("127.0.0.1", key)
    try:
        link = connect_events(listener.address, key, "worker0", {"pid": 42})
        hello = _next(listener)
        held = listener._links["worker0"]

        def cut_short(message: object) -> None:
            raise TimeoutError("timed out")

        monkeypatch.setattr(held, "send", cut_short)
        listener.send_stop("worker0")
        assert _next(listener) == ("closed", "worker0", hello[2]["link"])
        with pytest.raises(EOFError):
            link.recv()  # the process's end reads its launcher gone
        link.close()
    finally:
        listener.close()
