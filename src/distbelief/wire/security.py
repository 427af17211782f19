"""Who may talk to a shard: a per-job secret proven by mutual HMAC challenge-response on every new
connection (as multiprocessing does with its authkey), and optional TLS for encryption. A peer
of the other kind (a job key or TLS on one end only) is told so, and fails at once.

The handshake runs before any frame is read, so an unauthenticated peer never gets to send a
tensor. Key files must be readable by their owner only.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import shlex
import ssl
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from distbelief.errors import AuthenticationError, NotAPeerError, TLSMismatchError

if TYPE_CHECKING:
    from distbelief.wire.channels import Channel

AUTH_MAGIC = b"DBLA"
"""Opens what each side of the handshake says first: the shard's challenge, and the client's
announcement that it holds a job key (sent before the challenge arrives)."""
NO_KEY_MAGIC = b"DBLN"
"""What a shard that uses no job key answers a client's announcement with, before it hangs up:
the client fails at once rather than wait for a challenge that never comes. Over TLS, where the
client's first bytes cannot be peeked at, such a shard says it first to every client."""
TLS_MAGIC = b"DBLT"
"""Opens what a TLS shard says to a client that speaks plain TCP to it (its first byte is not
the start of a TLS handshake), before it hangs up: the client fails at once, naming TLS, rather
than wait out the shard's TLS handshake or retry a reset connection."""
TLS_RECORD = b"\x16"
"""The first byte of a TLS handshake record: what a TLS client's ClientHello starts with (no
plain peer's first bytes do: each of theirs starts with b"DBL" or b"DBS")."""
SPEAKS_TLS_NOTICE = (TLS_MAGIC + b" this shard speaks TLS\n").ljust(64)
"""All a TLS shard says to a plain client: at least a frame header long, so a client that sent
a frame first reads it where it expects a reply's header."""
NO_TLS_NOTICE = b"DBLP this shard does not speak TLS\n".ljust(64)
"""What a shard without TLS says to a TLS client (after its challenge, if it has a job key):
bytes that are no TLS record, so the client's TLS handshake fails at once (wrong version
number) rather than at end of stream, which would look like a lost connection."""
KEY_REFUSED_NOTICE = b"DBLR this shard refused the key\n"
"""What a keyed shard says, in place of its proof, to a client whose answer is wrong, before
it hangs up: the client tells a refusal from a shard that died mid-handshake (a lost
connection, retried). As long as a proof, so the client reads it where it expects one."""
SHARD_SPEAKS_TLS = "the shard speaks TLS: give --tls-ca (the CA of the shard's certificate)"
SHARD_SPEAKS_NO_TLS = (
    "the shard does not speak TLS: drop --tls-ca, or start the shard with --tls-cert and --tls-key"
)
NONCE_BYTES = 32
KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 4096
"""Longest key file read: a key's hex (keygen writes 65 bytes) with room for whitespace."""
_DIGEST = "sha256"
_DIGEST_BYTES = 32


@dataclass(frozen=True, slots=True)
class WireSecurity:
    """How connections of one job are secured. The default secures nothing."""

    auth_key: bytes | None = None
    """The job's shared secret; None: no authentication."""
    tls_cert: str | None = None
    """Server certificate (PEM); with tls_key, shards speak TLS."""
    tls_key: str | None = None
    """Server private key (PEM)."""
    tls_ca: str | None = None
    """CA bundle (PEM) clients verify shards against; set to make clients speak TLS."""

    def server_tls(self) -> ssl.SSLContext | None:
        if not (self.tls_cert and self.tls_key):
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def client_tls(self) -> ssl.SSLContext | None:
        if not self.tls_ca:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        return context


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def write_key_file(path: str | Path) -> Path:
    """Create a new key file readable by its owner only (atomically; never overwrites), and
    the folders above it that are missing.

    Raises:
        ValueError: naming the file: it exists already (a link to nowhere too), a folder above
            it is a file, or it cannot be written (the reason). Nothing is left behind, not
            even the folders made for it; or it names a folder (ends in a slash, or is one).
    """
    if str(path).endswith(os.sep):  # Path() drops the slash that says a folder is meant
        raise ValueError(f"key file {path}: names a folder; give the file's name in it")
    path = Path(path)
    made: list[Path] = []
    try:
        if path.is_symlink():
            link = os.readlink(path)
            raise ValueError(
                f"key file {path} already exists (a link to {link}): not overwriting it"
            )
        if path.is_dir():
            raise ValueError(f"key file {path}: is a folder; give the file's name in it")
        if path.exists():
            raise ValueError(f"key file {path} already exists: not overwriting it")
        above = [folder for folder in reversed(path.parents) if folder.exists()]
        if above and not above[-1].is_dir():
            raise ValueError(f"key file {path}: {above[-1]} is not a folder")
        made = [folder for folder in path.parents if not folder.exists()]  # deepest first
        _write_new_key(path)
    except OSError as e:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, FileExistsError) and e.filename2 is not None:  # appeared meanwhile
            raise ValueError(f"key file {path} already exists: not overwriting it") from None
        reason = e.strerror or str(e)
        raise ValueError(f"key file {path}: cannot write in {path.parent}: {reason}") from None
    return path


def _write_new_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(generate_key().hex().encode() + b"\n")
        os.link(tmp, path)  # fails if path appeared meanwhile, unlike rename
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_key_file(path: str | Path) -> bytes:
    """The key in ``path``; ValueError naming the file if it is missing, open to others or bad."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder is named below
            # Opening a named pipe waits for a writer that may never come; a device is no key.
            raise ValueError(
                f"key file {path}: not a regular file (make one with distbelief keygen)"
            )
        with path.open("rb") as file:
            # Bounded: a key is a line of hex, and a file named by mistake may be gigabytes.
            content = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"key file {path}: {e.strerror}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Its group's permissions alone, or others' too: the wording names who else may read.
        who = "its group" if not mode & stat.S_IRWXO else "others"
        # The command as the shell reads it: a path with a space is quoted.
        raise ValueError(f"key file {path} is open to {who}: chmod 600 {shlex.quote(str(path))}")
    if len(content) > MAX_KEY_FILE_BYTES:
        raise ValueError(
            f"key file {path}: over {MAX_KEY_FILE_BYTES} bytes, too long for a key file (make "
            "one with distbelief keygen)"
        )
    try:
        key = bytes.fromhex(content.decode("ascii").strip())
    except ValueError:  # UnicodeDecodeError too: a binary file is no hex key either
        raise ValueError(
            f"key file {path}: not a hex key (make one with distbelief keygen)"
        ) from None
    if len(key) < 16:
        raise ValueError(f"key file {path}: key of {len(key)} bytes is too short (need >= 16)")
    return key


def _recv_exact(channel: Channel, num_bytes: int, deadline: float) -> bytes:
    data = bytearray(num_bytes)
    view = memoryview(data)
    received = 0
    while received < num_bytes:
        channel.settimeout(max(0.001, deadline - time.monotonic()))
        count = channel.recv_into(view[received:], num_bytes - received)
        if count == 0:
            raise ConnectionResetError("peer closed the connection during authentication")
        received += count
    return bytes(data)


def _mac(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, role + nonce, _DIGEST).digest()


def accept_peer(channel: Channel, key: bytes, timeout_s: float) -> None:
    """Server side: challenge the peer, check its answer, prove we hold the key too.

    Raises:
        ProtocolError: the peer does not hold the key.
        OSError / TimeoutError: the connection failed or the peer was too slow.
    """
    channel.settimeout(timeout_s)
    check_answer(channel, key, send_challenge(channel), timeout_s)


ANSWER_BYTES = len(AUTH_MAGIC) + _DIGEST_BYTES + NONCE_BYTES
"""What a peer sends a keyed shard: its announcement, then its answer to the challenge (its
proof and its own challenge)."""


def send_challenge(channel: Channel) -> bytes:
    """Server side, first half: the challenge (a few bytes: a new connection's empty send
    buffer takes them at once). Returns it, for :func:`check_answer`."""
    challenge = secrets.token_bytes(NONCE_BYTES)
    channel.sendall(AUTH_MAGIC + challenge)
    return challenge


def check_answer(channel: Channel, key: bytes, challenge: bytes, timeout_s: float) -> None:
    """Server side, second half: the peer's answer to ``challenge`` (within ``timeout_s``)
    checked, then our proof sent.

    Raises:
        ProtocolError: the peer does not hold the key.
        OSError / TimeoutError: the connection failed or the peer was too slow.
    """
    deadline = time.monotonic() + timeout_s
    # The announcement is read on its own: a peer without a key speaks first (a frame) and
    # hangs up on the challenge, often before it has sent a whole answer's bytes; it is
    # refused all the same, not taken for a connection lost.
    if _recv_exact(channel, len(AUTH_MAGIC), deadline) != AUTH_MAGIC:
        _refuse_key(channel, "it has no job key")
    proof = _recv_exact(channel, ANSWER_BYTES - len(AUTH_MAGIC), deadline)
    if not hmac.compare_digest(proof[:_DIGEST_BYTES], _mac(key, b"client", challenge)):
        _refuse_key(channel, "wrong job key")
    channel.sendall(_mac(key, b"server", proof[_DIGEST_BYTES:]))


def _refuse_key(channel: Channel, why: str) -> NoReturn:
    with contextlib.suppress(OSError):  # a peer gone already needs no answer
        channel.sendall(KEY_REFUSED_NOTICE)
    raise AuthenticationError(f"peer failed authentication ({why})")


def refuse_announced_key(channel: Channel) -> None:
    """Server side, for a shard without a job key: tell a peer that announced one (its first
    bytes, already read) that this shard uses none; over TLS, tell every peer first."""
    channel.sendall(NO_KEY_MAGIC)


def check_server_uses_no_key(channel: Channel, timeout_s: float) -> None:
    """Client side without a job key, over TLS: the shard's first bytes say whether it uses
    one (a keyed shard's challenge) or not (:data:`NO_KEY_MAGIC`).

    Raises:
        AuthenticationError: the shard asks for a job key.
        NotAPeerError: the server is not a distbelief shard.
        OSError / TimeoutError: the connection failed or the server was too slow.
    """
    magic = _recv_exact(channel, len(AUTH_MAGIC), time.monotonic() + timeout_s)
    if magic == AUTH_MAGIC:
        raise AuthenticationError("the shard requires authentication: give the job's key")
    if magic != NO_KEY_MAGIC:
        raise NotAPeerError("server does not say whether it uses a job key: not a shard")


def authenticate_to_server(channel: Channel, key: bytes, timeout_s: float) -> None:
    """Client side: announce a key, answer the shard's challenge and check the shard's own
    proof.

    Raises:
        AuthenticationError: the shard uses no job key, refused this one, or does not hold it.
        NotAPeerError: the server is not a distbelief shard.
        OSError / TimeoutError: the connection failed or the server was too slow.
    """
    deadline = time.monotonic() + timeout_s
    # Said first: a shard without a key, which waits for the client to speak, answers it at
    # once with NO_KEY_MAGIC; a keyed shard has sent its challenge already.
    channel.sendall(AUTH_MAGIC)
    magic = _recv_exact(channel, len(AUTH_MAGIC), deadline)
    if magic == NO_KEY_MAGIC:
        raise AuthenticationError(
            "the shard does not use a job key: start it with --auth-key-file, or connect "
            "without a key"
        )
    if magic == TLS_MAGIC:
        raise TLSMismatchError(SHARD_SPEAKS_TLS)
    if magic != AUTH_MAGIC:
        raise NotAPeerError("server does not ask for authentication: not a secured shard")
    challenge = _recv_exact(channel, NONCE_BYTES, deadline)
    nonce = secrets.token_bytes(NONCE_BYTES)
    channel.sendall(_mac(key, b"client", challenge) + nonce)
    # A connection lost here is a shard that died mid-handshake, not a refusal: it says so.
    proof = _recv_exact(channel, _DIGEST_BYTES, deadline)
    if proof == KEY_REFUSED_NOTICE:
        raise AuthenticationError("the shard refused this job key")
    if not hmac.compare_digest(proof, _mac(key, b"server", nonce)):
        raise AuthenticationError("server failed authentication: it does not hold the job key")
