"""The shared-memory channel: between two processes of one host, bytes move through two ring
buffers in /dev/shm (one per direction) instead of the kernel's TCP stack. A TCP connection
beside them runs the job-key handshake before any memory is mapped, then carries the rings'
doorbells (every wait is a bounded receive on it), and shows a dead peer as end of stream.

``shm://HOST:PORT`` asks for it; ``tcp://`` connections switch to it by themselves when both
ends are on one host. ``DISTBELIEF_TRANSPORT`` (auto, tcp, shm) sets this per process. Where
shared memory cannot be used, the connection stays TCP and the log says why.

One file, longer than most: a channel kind is one module of this package, and its parts (the
segments, the ring channel, both ends of the switch-over, the dialer and listener) are used by
nothing else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import mmap
import os
import re
import secrets
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterable

from distbelief.config import TRANSPORT_ENV, TRANSPORTS, environment_setting
from distbelief.errors import AuthenticationError, NotAPeerError, ProtocolError, TLSMismatchError
from distbelief.wire.channels import (
    Channel,
    PeerSilent,
    register_channel,
    split_scheme,
    upgrade_channel,
)
from distbelief.wire.channels.tcp import (
    TcpChannel,
    TcpDialer,
    TcpIncoming,
    TcpListener,
    tcp_endpoint,
)
from distbelief.wire.message import MAGIC, PROTOCOL_VERSION
from distbelief.wire.security import AUTH_MAGIC, SHARD_SPEAKS_TLS, TLS_MAGIC

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "distbelief-"
"""Segment files are ``distbelief-<pid of the accepting process>-<token>-<0|1>``."""
DEFAULT_RING_BYTES = 4 * 1024 * 1024
MIN_RING_BYTES = 64 * 1024
MAX_RING_BYTES = 1024 * 1024 * 1024
CHUNKS_PER_RING = 4
"""A reader reports each quarter of the ring it read, and a writer copies at most a quarter
before ringing the doorbell."""
FIRST_CHUNK_BYTES = 256 * 1024
"""A large write rings after its first 256 KiB, then after twice as much each time (up to a
quarter ring): the reader starts copying out early, and few doorbells are rung."""
MAX_CHANNELS_PER_LISTENER = 64
"""Shared-memory connections one listener holds at once (each maps two rings): peers beyond it
stay on TCP, so thousands of same-host connections do not fill /dev/shm."""
STALE_SEGMENT_S = 60.0
"""A segment file this old whose accepting process is gone is left over (both ends of a
handshake killed at once): a new listener removes it."""
HANDSHAKE_TIMEOUT_S = 5.0
"""The server's bound on a peer's shared-memory handshake (the client's is its dial timeout)."""

UPGRADE_MAGIC = b"DBSH"
_VERSION = 1
_REQUEST = struct.Struct("<4sHQ")  # magic, version, ring bytes wanted
_ACCEPT = struct.Struct("<16sIQ")  # token, the server's pid, ring bytes (after a b"\x01")
_YES, _NO = b"\x01", b"\x00"
_CONTROL = struct.Struct("<q")
"""A doorbell: > 0 bytes were written to the ring; < 0 bytes of the peer's ring were read."""
_pack_doorbell, _unpack_doorbell = _CONTROL.pack, _CONTROL.unpack_from
_CONTROL_BUFFER_BYTES = 4096
_TOKEN = re.compile(rb"[0-9a-f]{16}")


def transport_setting(transport: str | None = None) -> str:
    """``transport``, or this process's ``DISTBELIEF_TRANSPORT`` (default auto).

    Raises:
        ValueError: not one of auto, tcp, shm (naming where it came from).
    """
    source = "transport" if transport is not None else TRANSPORT_ENV
    value = transport if transport is not None else environment_setting(TRANSPORT_ENV) or "auto"
    if value not in TRANSPORTS:
        raise ValueError(f"{source} {value!r}: must be one of {', '.join(TRANSPORTS)}")
    return value


def shm_address_ruled_out(addresses: Iterable[str], transport: str) -> tuple[str, str] | None:
    """The first of ``addresses`` that asks for shared memory (``shm://``) under the transport
    ``tcp``, which rules it out (with both, one of them would be ignored without a word), with
    the ``tcp://`` address to give instead; None when there is none."""
    if transport != "tcp":
        return None
    for address in addresses:
        scheme, rest = split_scheme(address)
        if scheme == "shm":
            return address, f"tcp://{rest}"
    return None


def check_shm_allowed(what: str, addresses: list[str]) -> list[str]:
    """``addresses``, unless one asks for shared memory (``shm://``) under
    ``DISTBELIEF_TRANSPORT=tcp``: one of the two would be ignored without a word.

    Raises:
        ValueError: naming ``what`` (``ps`` or ``DISTBELIEF_PS``) and the address; a bad
            ``DISTBELIEF_TRANSPORT`` (named).
    """
    ruled_out = shm_address_ruled_out(addresses, transport_setting())
    if ruled_out is not None:
        address, tcp_address = ruled_out
        raise ValueError(
            f"{what}: {address} asks for shared memory, which {TRANSPORT_ENV}=tcp rules out: "
            f"give {tcp_address}, or another {TRANSPORT_ENV}"
        )
    return addresses


def set_transport(transport: str) -> None:
    """Make channels this process (and the processes it starts) makes from now on use
    ``transport``; ValueError if it is not one of auto, tcp, shm."""
    os.environ[TRANSPORT_ENV] = transport_setting(transport)


def apply_job_transport(transport: str) -> None:
    """A job's ``--transport`` for this process and those it starts; its default (auto)
    leaves a ``DISTBELIEF_TRANSPORT`` the user set in place.

    Raises:
        ValueError: ``transport``, or the ``DISTBELIEF_TRANSPORT`` left in place, is not one
            of auto, tcp, shm.
    """
    if transport != "auto" or environment_setting(TRANSPORT_ENV) is None:
        set_transport(transport)
    else:
        transport_setting()  # refused here, not by each process at its first connection


# ---------------------------------------------------------------- segments


def segment_paths(server_pid: int, token: str) -> tuple[str, str]:
    """The files of one connection's rings: client to server, server to client."""
    base = os.path.join(SHM_DIR, f"{SEGMENT_PREFIX}{server_pid}-{token}")
    return f"{base}-0", f"{base}-1"


def _unlink(paths: tuple[str, ...]) -> None:
    """Remove a handshake's segment files, those that are there: on its way back to TCP too,
    so no error of it may replace that way back (a read-only /dev/shm refuses the unlink of a
    file it never held)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.debug("cannot remove %s: %s", path, e)


def remove_stale_segments() -> int:
    """Remove this user's segment files whose accepting process has died (named in the file)
    and that are older than ``STALE_SEGMENT_S``; returns how many. A live handshake's server
    is alive by definition, so nothing in use is removed."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    removed, now = 0, time.time()
    for name in names:
        pid_text = name.removeprefix(SEGMENT_PREFIX).split("-", 1)[0]
        if not name.startswith(SEGMENT_PREFIX) or not pid_text.isdigit():
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            info = os.lstat(path)
            if info.st_uid != os.geteuid() or now - info.st_mtime < STALE_SEGMENT_S:
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        except (OSError, OverflowError):
            continue  # gone already, or a process of another user: alive
    if removed:
        logger.info("removed %d shared-memory segments left by dead processes", removed)
    return removed


def _map(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _create_segment(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # Reserves the pages now: a full /dev/shm fails here, not with SIGBUS on a later write.
        os.posix_fallocate(fd, 0, size)
        return _map(fd, size)
    finally:
        os.close(fd)


def _open_segment(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        # Only a file of this user that nobody else can open: not one another user planted.
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise PermissionError(f"{path} is not a file of this user")
        if info.st_mode & 0o077 or info.st_size != size:
            raise PermissionError(f"{path} is open to others or not {size} bytes")
        return _map(fd, size)
    finally:
        os.close(fd)


class _Ring:
    """One direction's bytes: a mapped segment used as a circular buffer."""

    __slots__ = ("_map", "capacity", "chunk_bytes", "view")

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map = mapping
        self.view = memoryview(mapping)
        self.capacity = len(mapping)
        self.chunk_bytes = self.capacity // CHUNKS_PER_RING

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


# ---------------------------------------------------------------- the channel


def _bytes_view(buffer: bytes | bytearray | memoryview) -> memoryview:
    view = buffer if type(buffer) is memoryview else memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class ShmChannel:
    """A connected shared-memory channel: bytes through the rings, doorbells over ``control``.

    Each side counts what it may read (doorbells of the peer's writes) and what room is left
    in its own ring (the peer's reports of what it read); a wait is a receive on the control
    socket, so ``settimeout`` bounds it and a peer's death ends it. One thread at a time sends
    or receives (as a request/reply connection does); any thread may call ``shutdown``.
    """

    shares_memory = True
    """Both ends are on one host and may share memory (see ``wire/shared_params.py``)."""

    __slots__ = ("_doorbells", "_ended", "_in", "_out", "_partial", "_read_at", "_readable")
    __slots__ += ("_receive_doorbells", "_ring_doorbell", "_room", "_sock", "_unreported")
    __slots__ += ("_write_at", "settimeout")

    def __init__(self, control: socket.socket, outgoing: _Ring, incoming: _Ring) -> None:
        self._sock = control
        self._ring_doorbell = control.sendall
        self._receive_doorbells = control.recv_into
        self.settimeout = control.settimeout
        self._out, self._in = outgoing, incoming
        self._write_at, self._room = 0, outgoing.capacity
        self._read_at, self._readable, self._unreported = 0, 0, 0
        self._doorbells = memoryview(bytearray(_CONTROL_BUFFER_BYTES))
        self._partial = 0
        """Bytes of a doorbell whose rest has not arrived yet, at the buffer's start."""
        self._ended = False

    def _wait(self) -> bool:
        """Take in the next doorbells (blocking); False once the peer has closed."""
        if self._ended:
            return False
        partial, doorbells = self._partial, self._doorbells
        count = self._receive_doorbells(doorbells[partial:] if partial else doorbells)
        if count == 0:
            self._ended = True
            return False
        if count == _CONTROL.size and not partial:  # the usual case: one doorbell
            self._ring(_unpack_doorbell(doorbells)[0])
            return True
        end = partial + count
        whole = end - end % _CONTROL.size
        for (value,) in _CONTROL.iter_unpack(doorbells[:whole]):
            self._ring(value)
        self._partial = end - whole
        if self._partial:
            doorbells[: self._partial] = doorbells[whole:end]
        return True

    def _ring(self, value: int) -> None:
        if value > 0:
            self._readable += value
            if self._readable > self._in.capacity:
                raise ProtocolError(f"doorbells announce {self._readable} bytes in a smaller ring")
        else:
            self._room -= value
            if self._room > self._out.capacity:
                raise ProtocolError(f"the peer read more than was written ({self._room} bytes)")

    def sendall(self, data: bytes | bytearray | memoryview, /) -> None:
        view = _bytes_view(data)
        total, at, out = view.nbytes, self._write_at, self._out
        if total <= FIRST_CHUNK_BYTES and total <= self._room and at + total < out.capacity:
            # A frame's header, or a small frame: one copy, one doorbell.
            if total:
                out.view[at : at + total] = view
                self._write_at = at + total
                self._room -= total
                self._ring_doorbell(_pack_doorbell(total))
            return
        self._send_chunks(view)

    def _send_chunks(self, view: memoryview) -> None:
        ring, capacity, chunk_bytes = self._out.view, self._out.capacity, self._out.chunk_bytes
        total, sent, chunk = view.nbytes, 0, min(FIRST_CHUNK_BYTES, chunk_bytes)
        while sent < total:
            while self._room == 0:
                if not self._wait():
                    raise BrokenPipeError("the peer closed the shared-memory channel")
            count = min(total - sent, self._room, chunk)
            at = self._write_at
            first = min(count, capacity - at)
            ring[at : at + first] = view[sent : sent + first]
            if first < count:
                ring[: count - first] = view[sent + first : sent + count]
            self._write_at = (at + count) % capacity
            self._room -= count
            sent += count
            self._ring_doorbell(_pack_doorbell(count))
            chunk = min(2 * chunk, chunk_bytes)

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        while not self._readable:
            if not self._wait():
                return 0
        view = _bytes_view(buffer)
        count = min(nbytes or view.nbytes, view.nbytes, self._readable)
        ring, at = self._in, self._read_at
        capacity = ring.capacity
        if at + count <= capacity:
            view[:count] = ring.view[at : at + count]
        else:
            first = capacity - at
            view[:first] = ring.view[at:]
            view[first:count] = ring.view[: count - first]
        self._read_at = (at + count) % capacity
        self._readable -= count
        self._unreported += count
        if self._unreported >= ring.chunk_bytes:
            # Reported in batches: the writer only waits for room once its ring is full.
            # A writer that is gone needs no room: the bytes read are good all the same.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._ring_doorbell(_pack_doorbell(-self._unreported))
            self._unreported = 0
        return count

    def peer_closed(self) -> bool:
        """Whether the peer has closed its end (or the connection failed): a check that
        neither blocks nor takes bytes, for memory shared over this connection."""
        if self._ended:
            return True
        # A poll, not a receive: a socket with a timeout waits for bytes before it receives.
        events = select.poll()
        events.register(self._sock.fileno(), select.POLLIN)
        try:
            ready = events.poll(0)
        except (OSError, ValueError):  # closed here
            return True
        if not ready:
            return False
        if ready[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        try:  # readable: a doorbell not taken in yet, or the end of the stream
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except ValueError:  # a TLS socket takes no flags: not known here
            return False
        except OSError:
            return True

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # Doorbells not taken in yet are read first: a socket closed with unread bytes resets
        # the connection, and the peer could lose the end of what it was reading.
        with contextlib.suppress(OSError):
            self._sock.setblocking(False)
            while self._sock.recv_into(self._doorbells):
                pass
        self.shutdown()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._out.close()
        self._in.close()


# ---------------------------------------------------------------- the handshake


def _recv_exact(sock: socket.socket, num_bytes: int) -> bytes:
    data = bytearray(num_bytes)
    view, received = memoryview(data), 0
    while received < num_bytes:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise ConnectionResetError("peer closed the connection during the shm handshake")
        received += count
    return bytes(data)


def _same_host(sock: socket.socket) -> bool:
    """Whether the peer is on this host: a loopback address, or this end's own address."""
    local, peer = sock.getsockname()[0], sock.getpeername()[0]
    if local == peer:
        return True
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def _request_upgrade(
    tcp: TcpChannel, ring_bytes: int, timeout_s: float, name: str, asked: bool
) -> Channel:
    """The client's side: ask for shared memory, create the rings, wait until the server has
    mapped them, unlink them. Returns the shared-memory channel, or ``tcp`` if refused (a
    warning if shared memory was ``asked`` for, else an info line).

    Raises:
        AuthenticationError: the shard asks for a job key, or speaks TLS (TLSMismatchError).
        NotAPeerError: the server does not speak this handshake.
        ProtocolError: its offer is malformed.
        OSError / TimeoutError: the connection failed or the server was too slow.
    """
    sock = tcp.sock
    sock.settimeout(timeout_s)
    sock.sendall(_REQUEST.pack(UPGRADE_MAGIC, _VERSION, ring_bytes))
    status = _recv_exact(sock, 1)
    if status == _NO:
        logger.log(
            logging.WARNING if asked else logging.INFO,
            "%s: the server refused shared memory; using TCP",
            name,
        )
        return tcp
    if status != _YES:
        magic = status + _recv_exact(sock, len(AUTH_MAGIC) - 1)
        if magic == AUTH_MAGIC:
            raise AuthenticationError("the shard requires authentication: give the job's key")
        if magic == TLS_MAGIC:
            raise TLSMismatchError(SHARD_SPEAKS_TLS)
        # Said as the TCP channel says it: the user may not have asked for shared memory
        # (it is tried on this host unasked).
        if magic == MAGIC:  # a frame: a peer of another version of this protocol
            version = _recv_exact(sock, 1)[0]
            raise ProtocolError(f"protocol version {version} (this side speaks {PROTOCOL_VERSION})")
        raise NotAPeerError(f"bad magic {magic!r}: not a distbelief peer")
    token, server_pid, ring_bytes = _ACCEPT.unpack(_recv_exact(sock, _ACCEPT.size))
    if not _TOKEN.fullmatch(token) or not MIN_RING_BYTES <= ring_bytes <= MAX_RING_BYTES:
        raise ProtocolError("malformed shared-memory offer")
    paths = segment_paths(server_pid, token.decode())
    rings: list[_Ring] = []
    try:
        try:
            for path in paths:
                rings.append(_Ring(_create_segment(path, ring_bytes)))
        except OSError as e:
            sock.sendall(_NO)
            logger.warning("%s: cannot create shared memory (%s); using TCP", name, e)
            return tcp
        sock.sendall(_YES)
        if _recv_exact(sock, 1) != _YES:
            logger.warning("%s: the server could not map shared memory; using TCP", name)
            return tcp
        channel = ShmChannel(sock, outgoing=rings[0], incoming=rings[1])
        rings = []
        return channel
    finally:
        _unlink(paths)
        for ring in rings:
            ring.close()


class _Grants:
    """What a listener grants: shared memory unless its transport is tcp, to at most
    ``MAX_CHANNELS_PER_LISTENER`` connections at once."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self._lock = threading.Lock()
        self._held = 0

    def take(self, version: int, ring_bytes: int) -> str | None:
        """Holds one grant; or says why none is given."""
        if self.transport == "tcp":
            return "this process uses TCP only"
        if version != _VERSION:
            return f"handshake version {version} (this side speaks {_VERSION})"
        if not MIN_RING_BYTES <= ring_bytes <= MAX_RING_BYTES:
            return f"ring of {ring_bytes} bytes is outside [{MIN_RING_BYTES}, {MAX_RING_BYTES}]"
        if not os.path.isdir(SHM_DIR):
            return f"this host has no {SHM_DIR}"
        with self._lock:
            if self._held >= MAX_CHANNELS_PER_LISTENER:
                return f"{self._held} shared-memory connections are open already"
            self._held += 1
        return None

    def give_back(self) -> None:
        with self._lock:
            self._held -= 1


def _accept_upgrade(tcp: TcpChannel, request: bytes, grants: _Grants, peer: str) -> Channel:
    """The server's side of :func:`_request_upgrade`: offer segment names, map the segments
    the client made, unlink them (also when the client dies halfway). Returns the channel the
    connection goes on with; a shared-memory one holds a grant until it is closed.

    Raises:
        ConnectionError: the peer closed or stalled the handshake.
    """
    _, version, ring_bytes = _REQUEST.unpack(request)
    sock = tcp.sock
    previous_timeout_s = sock.gettimeout()
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    refusal = grants.take(version, ring_bytes)
    granted = refusal is None
    try:
        if refusal is not None:
            logger.info("%s asked for shared memory: %s; using TCP", peer, refusal)
            sock.sendall(_NO)
            return tcp
        token = secrets.token_hex(8)
        paths = segment_paths(os.getpid(), token)
        rings: list[_Ring] = []
        try:
            sock.sendall(_YES + _ACCEPT.pack(token.encode(), os.getpid(), ring_bytes))
            if _recv_exact(sock, 1) != _YES:
                return tcp  # the client could not make them, and logs why
            try:
                for path in paths:
                    rings.append(_Ring(_open_segment(path, ring_bytes)))
            except OSError as e:
                for ring in rings:
                    ring.close()
                logger.info("%s: cannot map its shared memory (%s); using TCP", peer, e)
                sock.sendall(_NO)
                return tcp
        finally:
            _unlink(paths)
        try:
            sock.sendall(_YES)
        except BaseException:
            for ring in rings:
                ring.close()
            raise
        granted = False  # held by the channel now, until it is closed
        return ShmChannel(sock, outgoing=rings[1], incoming=rings[0])
    except TimeoutError as e:
        # Not a TimeoutError: the server would take it for an idle connection and wait on.
        raise ConnectionError(f"{peer} stalled the shared-memory handshake") from e
    finally:
        if granted:
            grants.give_back()
        with contextlib.suppress(OSError):
            sock.settimeout(previous_timeout_s)


class _UpgradeOnRequest:
    """A channel the server accepted over TCP: its first bytes decide whether it stays TCP or
    the peer asked for shared memory. Either way, the chosen channel's own methods replace
    this object's after that, so no layer is left on the data path.

    While it is TCP (or undecided) it is a PollableChannel: a serving pool watches its socket.
    Switched to shared memory it no longer is (``fileno`` and ``pending`` are gone: no poller
    sees bytes arrive in a ring), and the server gives it a thread of its own.
    """

    __slots__ = ("_channel", "_grants", "_peer", "_probe", "_probed", "_replay")
    __slots__ += ("fileno", "pending", "recv_into", "sendall", "settimeout")

    def __init__(self, tcp: TcpChannel, grants: _Grants, peer: str) -> None:
        self._channel: Channel = tcp
        self._grants: _Grants | None = grants
        self._peer = peer
        self._probe = bytearray(_REQUEST.size)
        self._probed = 0
        self._replay = b""
        self.recv_into = self._first_recv_into
        self.sendall = self._first_sendall
        self.settimeout = tcp.settimeout
        self.fileno = tcp.fileno
        self.pending = self._pending

    def _decide(self) -> None:
        """Read the peer's first bytes (bounded by the channel's timeout; resumed if that
        passes) and switch to the channel they ask for."""
        tcp = self._channel
        assert isinstance(tcp, TcpChannel)
        view = memoryview(self._probe)
        while self._probed < _REQUEST.size:
            count = tcp.recv_into(view[self._probed :])
            if count == 0:
                break
            self._probed += count
            seen = min(self._probed, len(UPGRADE_MAGIC))
            if self._probe[:seen] != UPGRADE_MAGIC[:seen]:
                break
        if self._probed == _REQUEST.size and self._probe.startswith(UPGRADE_MAGIC):
            assert self._grants is not None
            self._channel = _accept_upgrade(tcp, bytes(self._probe), self._grants, self._peer)
            self.recv_into = self._channel.recv_into
            if isinstance(self._channel, ShmChannel):
                del self.fileno, self.pending
        else:
            self._replay = bytes(self._probe[: self._probed])
            self.recv_into = self._replay_into if self._replay else tcp.recv_into
        self.sendall = self._channel.sendall

    def _pending(self) -> int:
        """Bytes received but not read yet: those read to decide, and TLS's."""
        tcp = self._channel
        return len(self._replay) + (tcp.pending() if isinstance(tcp, TcpChannel) else 0)

    def _first_recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        self._decide()
        return self.recv_into(buffer, nbytes)

    def _first_sendall(self, data: bytes | bytearray | memoryview, /) -> None:
        # A server speaks only after its peer has: whatever the peer sent first is read now.
        self._decide()
        self.sendall(data)

    def _replay_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        """The bytes read to decide, then the socket's own receives."""
        view = _bytes_view(buffer)
        count = min(nbytes or view.nbytes, view.nbytes, len(self._replay))
        view[:count] = self._replay[:count]
        self._replay = self._replay[count:]
        if not self._replay:
            self.recv_into = self._channel.recv_into
        return count

    def shutdown(self) -> None:
        self._channel.shutdown()

    def close(self) -> None:
        self._channel.close()
        if isinstance(self._channel, ShmChannel) and self._grants is not None:
            self._grants.give_back()
            self._grants = None  # given back once, however often this is closed


# ---------------------------------------------------------------- dialer and listener


class ShmDialer:
    """Opens channels to one address: TCP with its TLS and job-key handshake, then shared
    memory where it can be used.

    Args:
        address: ``shm://HOST:PORT`` (asks for shared memory) or ``tcp://HOST:PORT`` (uses it
            when the server is on this host, with the transport ``auto``).
        transport: auto, tcp or shm (default: ``DISTBELIEF_TRANSPORT``, else auto).
        ring_bytes: Size of each direction's ring.
        **tcp_options: The TCP dialer's (``security``: job key and TLS settings).

    Raises:
        ValueError: the address, transport or ring size is malformed.
    """

    def __init__(
        self,
        address: str,
        *,
        transport: str | None = None,
        ring_bytes: int = DEFAULT_RING_BYTES,
        **tcp_options,
    ) -> None:
        self._address = address
        tcp_address = tcp_endpoint(address)
        try:
            self._tcp = TcpDialer(tcp_address, **tcp_options)
        except ValueError as e:  # named as given (port 0, say), not as the TCP address beside
            # Of the same type: a host that cannot be looked up stays an UnknownHostError.
            raise type(e)(str(e).replace(repr(tcp_address), repr(address))) from None
        self._transport = transport_setting(transport)
        if not MIN_RING_BYTES <= ring_bytes <= MAX_RING_BYTES:
            raise ValueError(
                f"ring_bytes {ring_bytes}: must be in [{MIN_RING_BYTES}, {MAX_RING_BYTES}]"
            )
        self._ring_bytes = ring_bytes
        self._asks = self._transport == "shm" or (
            self._transport == "auto" and split_scheme(address)[0] == "shm"
        )

    def _wants_shm(self, tcp: TcpChannel) -> bool:
        if self._transport == "tcp":
            return False
        if not os.path.isdir(SHM_DIR):
            logger.log(
                logging.WARNING if self._asks else logging.DEBUG,
                "%s: this host has no %s; using TCP",
                self._address,
                SHM_DIR,
            )
            return False
        if self._asks:
            return True
        return _same_host(tcp.sock)

    def __call__(self, timeout_s: float) -> Channel:
        """A new channel, connected, authenticated and switched within about ``timeout_s``.

        Raises:
            ProtocolError: the server is not a shard of this job.
            TimeoutError / OSError: the server could not be reached in time.
        """
        tcp = self._tcp(timeout_s)
        try:
            if not self._wants_shm(tcp):
                return tcp
            channel = _request_upgrade(tcp, self._ring_bytes, timeout_s, self._address, self._asks)
            if channel is tcp:
                tcp.settimeout(timeout_s)
            return channel
        except TimeoutError as e:
            tcp.close()
            if isinstance(e, PeerSilent):
                raise
            raise PeerSilent(str(e)) from e
        except BaseException:
            tcp.close()
            raise


class _ShmIncoming:
    """An accepted connection: TCP's own handshakes, then the peer may ask for shared memory."""

    def __init__(self, incoming: TcpIncoming, grants: _Grants) -> None:
        self.peer = incoming.peer
        self._incoming = incoming
        self._grants = grants

    def open(self, timeout_s: float) -> _UpgradeOnRequest:
        """TLS and the job key (see :meth:`TcpIncoming.open`); shared memory comes later, if
        the peer's first bytes ask for it.

        Raises:
            ProtocolError: the peer does not hold the job key.
            OSError / TimeoutError: the connection or TLS failed, or the peer was too slow.
        """
        return _UpgradeOnRequest(self._incoming.open(timeout_s), self._grants, self.peer)

    def greet(self) -> int:
        """See :meth:`TcpIncoming.greet` (the request for shared memory comes after)."""
        return self._incoming.greet()

    def shutdown(self) -> None:
        self._incoming.shutdown()

    def close(self) -> None:
        self._incoming.close()


class ShmListener:
    """A TCP listener whose connections switch to shared memory when the peer asks.

    Args:
        address: ``shm://HOST:PORT`` or ``tcp://HOST:PORT`` to bind (port 0: a free one).
        transport: tcp refuses shared memory; auto and shm grant it, to at most
            ``MAX_CHANNELS_PER_LISTENER`` connections at once (default:
            ``DISTBELIEF_TRANSPORT``, else auto).
        **tcp_options: The TCP listener's (``security``: job key and TLS settings every
            accepted connection must meet).

    Raises:
        ValueError: the address or transport is malformed.
        BindError: the address cannot be bound (a ShardUnavailableError).
    """

    def __init__(self, address: str, *, transport: str | None = None, **tcp_options) -> None:
        self._scheme = split_scheme(address)[0]
        self._grants = _Grants(transport_setting(transport))
        self._tcp = TcpListener(tcp_endpoint(address), **tcp_options)
        if self._grants.transport != "tcp":
            remove_stale_segments()

    @property
    def address(self) -> str:
        return f"{self._scheme}://{split_scheme(self._tcp.address)[1]}"

    def accept(self, timeout_s: float) -> _ShmIncoming:
        """The next connection (its handshakes not run yet).

        Raises:
            TimeoutError: none arrived within ``timeout_s``.
            OSError: the listener is closed.
        """
        return _ShmIncoming(self._tcp.accept(timeout_s), self._grants)

    def close(self) -> None:
        self._tcp.close()


register_channel("shm", ShmDialer, ShmListener, local_address="shm://127.0.0.1:0")
upgrade_channel("tcp", ShmDialer, ShmListener)
