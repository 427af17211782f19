"""The TCP channel: sockets only. Parses ``tcp://HOST:PORT``, sets TCP_NODELAY, wraps TLS and runs
the job-key handshake on connect and on accept. Knows nothing of frames or requests.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

from distbelief.errors import AuthenticationError, BindError, ProtocolError, TLSMismatchError
from distbelief.hosts import check_known_host, check_local_host, check_reachable_from
from distbelief.wire.channels import PeerSilent, check_scheme, register_channel, split_scheme
from distbelief.wire.security import (
    ANSWER_BYTES,
    AUTH_MAGIC,
    NO_TLS_NOTICE,
    SHARD_SPEAKS_NO_TLS,
    SPEAKS_TLS_NOTICE,
    TLS_RECORD,
    WireSecurity,
    accept_peer,
    authenticate_to_server,
    check_answer,
    check_server_uses_no_key,
    refuse_announced_key,
    send_challenge,
)

_BACKLOG = 128
_GREETING_TIMEOUT_S = 5.0
"""Bounds the challenge's send (a new connection's empty send buffer takes it at once)."""


def parse_tcp_address(address: str) -> tuple[str, int]:
    """``"tcp://host:port"`` or ``"host:port"`` -> ``(host, port)``; ValueError if malformed."""
    rest = address.removeprefix("tcp://")
    host, sep, port_text = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif "[" in host or "]" in host or "/" in host:  # a bracket without its pair; tcp//h
        host = ""
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"address {address!r} is not of the form tcp://HOST:PORT")
    if int(port_text) > 65535:
        raise ValueError(f"address {address!r}: port {port_text} is out of range (0-65535)")
    return host, int(port_text)


def tcp_endpoint(address: str) -> str:
    """``shm://h:p``, ``tcp://h:p`` or ``h:p`` -> ``tcp://h:p`` (the socket every channel kind
    listens or dials on); ValueError naming ``address`` as given."""
    scheme, rest = split_scheme(address)
    tcp_address = f"tcp://{rest}"
    try:
        parse_tcp_address(tcp_address)
    except ValueError as e:
        message = str(e).replace(repr(tcp_address), repr(address))
        raise ValueError(message.replace("tcp://HOST:PORT", f"{scheme}://HOST:PORT")) from None
    return tcp_address


def check_address_form(address: str) -> None:
    """Refuses an address whose scheme no channel registered, or not of the form
    ``SCHEME://HOST:PORT`` (port 0 allowed), looking no host up: ValueError naming it."""
    check_scheme(address)
    tcp_endpoint(address)


def check_dial_address_form(address: str) -> None:
    """``check_address_form`` for an address to connect to: port 0 is refused too."""
    check_address_form(address)
    refuse_port_zero(address, parse_tcp_address(tcp_endpoint(address))[1])


def refuse_port_zero(address: str, port: int) -> None:
    """A typo in the port, or a server's port 0 copied as given, would otherwise be retried
    until the retry timeout: ValueError naming ``address``."""
    if port == 0:
        raise ValueError(
            f"address {address!r}: port 0 cannot be connected to (a server bound to port 0 "
            "prints the port it took)"
        )


def _tune(sock: socket.socket) -> None:
    # Only TCP_NODELAY: fixing SO_SNDBUF/SO_RCVBUF would switch off the kernel's buffer
    # autotuning, which measured 6-20% faster for 25M-element tensors.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _shutdown(sock: socket.socket) -> None:
    # Wakes a thread blocked in recv on this socket; close alone does not, and closing from
    # another thread could let a new connection reuse the descriptor under that thread.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    _shutdown(sock)
    with contextlib.suppress(OSError):
        sock.close()


def _nothing_pending() -> int:
    return 0


def _say_and_hang_up(sock: socket.socket, notice: bytes, timeout_s: float) -> None:
    """Send ``notice`` and close our side, then read what the peer sent until it hangs up too
    (for at most ``timeout_s``): closing over unread bytes resets the connection, and the peer
    could lose the notice."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(OSError):
        sock.settimeout(timeout_s)
        sock.sendall(notice)
        sock.shutdown(socket.SHUT_WR)
        while (remaining_s := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining_s)
            if not sock.recv(65536):
                break


def _tls_refusal(error: ssl.SSLError, ca: str | None) -> TLSMismatchError | None:
    """The client's TLS handshake failed for a reason another try would meet again: the error
    that says so; None for one that may be the network's (the connection closed midway)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return TLSMismatchError(
            f"certificate verify failed: {error.verify_message} (the shard's certificate, "
            f"checked against --tls-ca {ca})"
        )
    if error.reason == "WRONG_VERSION_NUMBER":  # the shard's first bytes are no TLS record
        return TLSMismatchError(SHARD_SPEAKS_NO_TLS)
    return None


class TcpChannel:
    """A connected (perhaps TLS) socket as a PollableChannel.

    The socket's own methods are bound once here, so sending and receiving through the channel
    cost no Python call more than through the socket.
    """

    __slots__ = ("fileno", "pending", "recv_into", "sendall", "settimeout", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sendall = sock.sendall
        self.recv_into = sock.recv_into
        self.settimeout = sock.settimeout
        self.fileno = sock.fileno
        # TLS decodes whole records: bytes of one may wait in the SSL object, unseen by poll.
        self.pending = sock.pending if isinstance(sock, ssl.SSLSocket) else _nothing_pending

    def shutdown(self) -> None:
        _shutdown(self.sock)

    def close(self) -> None:
        _close(self.sock)


class TcpDialer:
    """Opens TCP channels to one address: TLS if the security settings ask for it, then the
    job-key handshake.

    Args:
        address: ``tcp://HOST:PORT``.
        security: Job key and TLS settings (default: neither).
        source_host: The address of this machine the connections leave from (default: the
            one the operating system picks).

    Raises:
        ValueError: ``address`` is malformed, of port 0 or names a host no lookup knows, or
            ``source_host`` is no address of this machine.
    """

    def __init__(
        self,
        address: str,
        *,
        security: WireSecurity | None = None,
        source_host: str | None = None,
    ) -> None:
        self._endpoint = parse_tcp_address(address)
        refuse_port_zero(address, self._endpoint[1])
        check_known_host(self._endpoint[0])
        self._security = security or WireSecurity()
        self._tls = self._security.client_tls()
        self._source = None
        if source_host:
            try:
                check_local_host(source_host)
            except ValueError as e:  # named as the caller gave it (DownpourSGD's argument)
                raise ValueError(f"source_host {e}") from None
            check_reachable_from(self._endpoint[0], source_host)
            self._source = (source_host, 0)

    def __call__(self, timeout_s: float) -> TcpChannel:
        """A new channel, connected and authenticated within about ``timeout_s``.

        Raises:
            TLSMismatchError: the shard speaks TLS and this dialer not, or the reverse, or the
                shard's certificate does not verify.
            ProtocolError: the server is not a shard of this job.
            TimeoutError / OSError: the server could not be reached in time.
        """
        sock = socket.create_connection(
            self._endpoint, timeout=timeout_s, source_address=self._source
        )
        try:
            _tune(sock)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=self._endpoint[0])
                except ssl.SSLError as e:
                    refusal = _tls_refusal(e, self._security.tls_ca)
                    if refusal is None:
                        raise
                    raise refusal from e
            if self._security.auth_key is not None:
                authenticate_to_server(sock, self._security.auth_key, timeout_s)
            elif self._tls is not None:
                check_server_uses_no_key(sock, timeout_s)  # what a shard over TLS says first
        except TimeoutError as e:
            sock.close()
            raise PeerSilent(str(e)) from e
        except BaseException:
            sock.close()
            raise
        return TcpChannel(sock)


class TcpIncoming:
    """An accepted TCP connection whose TLS and job-key handshakes are still to run."""

    def __init__(
        self, sock: socket.socket, peer: str, tls: ssl.SSLContext | None, auth_key: bytes | None
    ) -> None:
        self.peer = peer
        self._sock = sock
        self._tls = tls
        self._auth_key = auth_key
        self._challenge: bytes | None = None
        """Sent by :meth:`greet`, still to be answered."""

    def greet(self) -> int:
        """Say what the server says first (the job-key challenge, unless TLS comes before it),
        and return a descriptor that polls readable once the peer's reply has arrived whole, or
        the peer has closed: until then the connection needs no thread, and :meth:`open` does
        not wait on the peer for it.

        Raises:
            OSError: the peer is gone already.
        """
        reply_bytes = 1  # TLS's ClientHello
        if self._tls is None and self._auth_key is not None:
            self._sock.settimeout(_GREETING_TIMEOUT_S)
            self._challenge = send_challenge(self._sock)
            reply_bytes = ANSWER_BYTES
        elif self._tls is None:
            # Without a challenge the peer speaks first: a frame, a request for shared memory,
            # or the announcement of a key (each at least this long), which open() looks at.
            reply_bytes = len(AUTH_MAGIC)
        # Poll reports the socket readable only once this many bytes wait in it: a peer that
        # sends part of its answer and stalls costs no thread either.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, reply_bytes)
        return self._sock.fileno()

    def open(self, timeout_s: float) -> TcpChannel:
        """TLS and authentication, before a single frame is read from the peer.

        Raises:
            ProtocolError: the peer does not hold the job key, or speaks TLS where this server
                does not, or the reverse (it was told so).
            OSError / TimeoutError: the connection or TLS failed, or the peer was too slow.
        """
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            self._sock.settimeout(timeout_s)
            self._refuse_the_other_kind(timeout_s)
            if self._tls is not None:
                self._sock = self._tls.wrap_socket(self._sock, server_side=True)
            if self._auth_key is not None:
                try:
                    self._authenticate(timeout_s)
                except ProtocolError as e:
                    raise ProtocolError(f"refused unauthenticated peer {self.peer}: {e}") from e
                # An OSError goes on as one: a peer that left or stalled before it answered
                # (a launcher's probe given up while this shard was stopped) refused nothing.
            elif self._tls is None:
                self._refuse_an_announced_key(timeout_s)
            else:
                # Inside TLS the peer's first bytes cannot be peeked at (they would have to be
                # read, and put back for the layers above): every peer is told at once instead.
                refuse_announced_key(self._sock)
        except BaseException:
            _close(self._sock)
            raise
        return TcpChannel(self._sock)

    def _refuse_the_other_kind(self, timeout_s: float) -> None:
        """A peer that speaks TLS where this server does not, or the reverse, is told so in
        plain text (see :data:`SPEAKS_TLS_NOTICE`) and refused: it fails at once, not after
        timeouts or retries. Its first byte (there since :meth:`greet`) tells: a TLS
        handshake's, or a plain peer's. It is only peeked at, and stays for the layers above.

        Raises:
            ProtocolError: the peer is of the other kind.
            OSError / TimeoutError: the connection failed or the peer was too slow.
        """
        first = self._sock.recv(1, socket.MSG_PEEK)
        if not first or (first == TLS_RECORD) == (self._tls is not None):
            return  # of this kind, or gone (the handshakes below say so)
        if self._tls is not None:
            _say_and_hang_up(self._sock, SPEAKS_TLS_NOTICE, timeout_s)
            raise ProtocolError(f"refused peer {self.peer}: it does not speak TLS, this shard does")
        _say_and_hang_up(self._sock, NO_TLS_NOTICE, timeout_s)
        raise ProtocolError(f"refused peer {self.peer}: it speaks TLS, this shard does not")

    def _authenticate(self, timeout_s: float) -> None:
        assert self._auth_key is not None
        if self._challenge is None:
            accept_peer(self._sock, self._auth_key, timeout_s)
        else:
            self._sock.settimeout(timeout_s)
            check_answer(self._sock, self._auth_key, self._challenge, timeout_s)

    def _refuse_an_announced_key(self, timeout_s: float) -> None:
        """No job key here: a peer whose first bytes announce one is told so, not left waiting
        for a challenge. Other first bytes (a frame, a request for shared memory) are only
        peeked at, and stay for the layers above.

        Raises:
            AuthenticationError: the peer announced a key.
            OSError / TimeoutError: the connection failed or the peer was too slow.
        """
        self._sock.settimeout(timeout_s)
        first = self._sock.recv(len(AUTH_MAGIC), socket.MSG_PEEK | socket.MSG_WAITALL)
        if first != AUTH_MAGIC:
            return
        # Read, not only peeked: closing over unread bytes resets the connection, and the
        # peer could lose the answer.
        self._sock.recv(len(AUTH_MAGIC))
        refuse_announced_key(self._sock)
        raise AuthenticationError(
            f"refused peer {self.peer}: it gives a job key, and this shard uses none"
        )

    def shutdown(self) -> None:
        _shutdown(self._sock)

    def close(self) -> None:
        _close(self._sock)


class TcpListener:
    """A bound, listening TCP socket.

    Args:
        address: ``tcp://HOST:PORT`` to bind (port 0 picks a free one).
        security: Job key and TLS settings every accepted connection must meet.

    Raises:
        BindError: the address cannot be bound (another process holds the port, say).
    """

    def __init__(self, address: str, *, security: WireSecurity | None = None) -> None:
        host, port = parse_tcp_address(address)
        security = security or WireSecurity()
        self._tls = security.server_tls()
        self._auth_key = security.auth_key
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            reason = e.strerror or str(e)
            raise BindError(address, reason[:1].lower() + reason[1:]) from e
        self._sock.listen(_BACKLOG)
        self._accept_timeout_s: float | None = None
        bound_host, bound_port = self._sock.getsockname()[:2]
        # An IPv6 host in brackets, as an address is written (RFC 3986) and --bind takes it.
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._address = f"tcp://{shown}:{bound_port}"

    @property
    def address(self) -> str:
        return self._address

    def accept(self, timeout_s: float) -> TcpIncoming:
        """The next connection (its handshakes not run yet).

        Raises:
            TimeoutError: none arrived within ``timeout_s``.
            OSError: the listener is closed.
        """
        if self._accept_timeout_s != timeout_s:
            self._sock.settimeout(timeout_s)
            self._accept_timeout_s = timeout_s
        sock, peer = self._sock.accept()
        _tune(sock)
        return TcpIncoming(sock, f"{peer[0]}:{peer[1]}", self._tls, self._auth_key)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


register_channel("tcp", TcpDialer, TcpListener, local_address="tcp://127.0.0.1:0")
