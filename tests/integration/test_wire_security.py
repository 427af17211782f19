"""Authentication (and its handshake as README spells it, from a plain socket), TLS and hostile
frames on every channel kind, and a live shard under 10,000 random, malformed and truncated
frames."""

import contextlib
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import shutil
import socket
import struct
import subprocess
import time

import pytest
import torch
from torch import nn

from distbelief.client import ParameterServerClient
from distbelief.errors import (
    AuthenticationError,
    ProtocolError,
    PSError,
    TLSMismatchError,
    TooManyConnectionsError,
)
from distbelief.launch.cli import main as cli_main
from distbelief.optim import DownpourSGD
from distbelief.server import ParameterShard, ShardService, server_optimizer_factory
from distbelief.wire import Message, connect, ops, rpc_server, serve
from distbelief.wire.channels import dial, local_address
from distbelief.wire.channels.shm import ShmChannel
from distbelief.wire.channels.tcp import TcpChannel, parse_tcp_address
from distbelief.wire.message import HEADER, MAGIC, PROTOCOL_VERSION
from distbelief.wire.reader import FrameReader, recv_message
from distbelief.wire.security import AUTH_MAGIC, WireSecurity, read_key_file, write_key_file
from tests.conftest import run_forked, start_shard, stop_processes
from tests.integration.test_transport import EchoService

NUM_FUZZ_FRAMES = 4_000
FUZZ_TIME_LIMIT_S = 90.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def test_only_key_holders_get_in(scheme, caplog):
    key = b"k" * 32
    server = serve(local_address(scheme), EchoService(), security=WireSecurity(auth_key=key))
    caplog.set_level(logging.WARNING, logger="distbelief.wire")
    try:
        good = connect(server.address, name="shard", security=WireSecurity(auth_key=key))
        assert good.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
        assert type(good._channel) is {"tcp": TcpChannel, "shm": ShmChannel}[scheme]
        good.close()
        anonymous = connect(server.address, name="shard")
        with pytest.raises(ProtocolError, match="requires authentication"):
            anonymous.request(Message(ops.HELLO), timeout_s=5)
        stranger = connect(server.address, name="shard", security=WireSecurity(auth_key=b"x" * 32))
        with pytest.raises(ProtocolError, match="refused this job key"):
            stranger.request(Message(ops.HELLO), timeout_s=5)
        # Both refusals are logged by the server, the keyless peer's too (it hangs up on the
        # challenge, having sent a frame's first bytes: no connection lost). In either order:
        # the keyless peer's is logged once the server sees it hang up, which a busy machine
        # may delay past the stranger's.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_refusals(caplog)) < 2:
            time.sleep(0.05)
        assert sorted(_refusals(caplog)) == ["it has no job key", "wrong job key"]
    finally:
        server.stop()


def _refusals(caplog) -> list[str]:
    found = (re.search(r"failed authentication \((.+?)\)", r.getMessage()) for r in caplog.records)
    return [match.group(1) for match in found if match]


def test_a_key_given_to_a_shard_without_one_is_refused_at_once(scheme):
    server = serve(local_address(scheme), EchoService())
    try:
        keyed = connect(server.address, name="shard", security=WireSecurity(auth_key=b"x" * 32))
        with pytest.raises(AuthenticationError, match="the shard does not use a job key"):
            keyed.request(Message(ops.HELLO), timeout_s=30)
        anonymous = connect(server.address, name="shard")  # still served as before
        assert anonymous.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
        assert type(anonymous._channel) is {"tcp": TcpChannel, "shm": ShmChannel}[scheme]
        anonymous.close()
    finally:
        server.stop()


def test_downpour_with_a_key_against_a_shard_without_one_is_not_retried(tmp_path, capsys):
    server = serve(
        "tcp://127.0.0.1:0",
        ShardService(ParameterShard(0, 1, server_optimizer_factory("sgd", lr=0.1))),
    )
    try:
        model = _model()
        started = time.monotonic()
        with pytest.raises(AuthenticationError, match="start it with --auth-key-file"):
            DownpourSGD(
                model.parameters(),
                model=model,
                ps=[server.address],
                auth_key=b"x" * 32,
                retry_timeout_s=60,
            )
        assert time.monotonic() - started < 30  # refused, not retried for retry_timeout_s
        key_file = write_key_file(tmp_path / "job.key")
        worker = ["worker", "--ps", server.address, "--rank", "0", "--num-workers", "1"]
        assert cli_main([*worker, "--steps", "1", "--auth-key-file", str(key_file)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.endswith(
            "the shard does not use a job key: start it with --auth-key-file, or connect "
            "without a key"
        )
    finally:
        server.stop()


HANDSHAKE_HOGS = 48
"""Six times a server's handshake threads: when each hog held one for the 5 s handshake
timeout, in arrival order, a worker arriving after them waited 30 s."""


def _read_to_end(sock: socket.socket) -> bytes:
    """What ``sock`` receives until the peer closes it (or resets it: bytes it never read)."""
    sock.settimeout(30)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


@pytest.mark.parametrize("answer", [b"", b"x" * 10], ids=["silent", "half-answer"])
def test_peers_that_never_answer_the_challenge_keep_no_one_out(scheme, answer):
    key = b"k" * 32
    server = serve(local_address(scheme), EchoService(), security=WireSecurity(auth_key=key))
    host, port = parse_tcp_address(server.address.split("://", 1)[1])
    hogs = []
    try:
        for _ in range(HANDSHAKE_HOGS):
            hog = socket.create_connection((host, port), timeout=10)
            hog.sendall(answer)
            hogs.append(hog)
        started = time.monotonic()
        good = connect(server.address, name="shard", security=WireSecurity(auth_key=key))
        assert good.request(Message(ops.HELLO), timeout_s=60).meta == {"seen": 0}
        assert time.monotonic() - started < 15
        good.close()
        # Each hog was challenged, then closed once its handshake time was up.
        assert all(_read_to_end(hog).startswith(AUTH_MAGIC) for hog in hogs)
    finally:
        for hog in hogs:
            hog.close()
        server.stop()


@pytest.fixture
def tls_files(tmp_path):
    """A self-signed certificate for 127.0.0.1 and its key: (cert.pem, key.pem)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    _make_certificate(cert, key_pem)
    return cert, key_pem


def test_a_bad_tls_key_is_named_by_its_flag(tmp_path, tls_files):
    from distbelief.launch.cli import parse_args
    from distbelief.launch.flags import security_from_args

    cert, _ = tls_files
    not_a_key = write_key_file(tmp_path / "job.key")
    other_key = tmp_path / "other-key.pem"
    _make_certificate(tmp_path / "other-cert.pem", other_key)
    shard = ["ps", "--shard-id", "0", "--num-shards", "1", "--no-auth", "--tls-cert", str(cert)]
    for key, problem in (
        (not_a_key, "not a PEM private key ("),
        (other_key, f"not the private key of --tls-cert {cert}"),
    ):
        with pytest.raises(ValueError) as refused:
            security_from_args(parse_args([*shard, "--tls-key", str(key)]))
        assert str(refused.value).startswith(f"--tls-key {key}: {problem}")


def _make_certificate(cert, key_pem) -> None:
    """A self-signed certificate for 127.0.0.1 at ``cert``, its key at ``key_pem``."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key_pem),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_tls_with_authentication(tls_files, scheme):
    cert, key_pem = tls_files
    secret = b"s" * 32
    server = serve(
        local_address(scheme),
        EchoService(),
        security=WireSecurity(auth_key=secret, tls_cert=str(cert), tls_key=str(key_pem)),
    )
    try:
        client = connect(
            server.address, name="shard", security=WireSecurity(auth_key=secret, tls_ca=str(cert))
        )
        payload = torch.randn(100_000)
        reply = client.request(Message(ops.PUSH, {}, [("w", payload)]), timeout_s=10)
        assert torch.equal(reply.tensors[0][1], payload)
        assert type(client._channel) is {"tcp": TcpChannel, "shm": ShmChannel}[scheme]
        client.close()
        anonymous = connect(server.address, name="shard", security=WireSecurity(tls_ca=str(cert)))
        with pytest.raises(AuthenticationError, match="requires authentication"):
            anonymous.request(Message(ops.HELLO), timeout_s=30)
        if scheme == "tcp":  # both kinds start on the same TCP handshakes: checked once
            plain = connect(server.address, name="shard", security=WireSecurity(auth_key=secret))
            with pytest.raises(PSError, match="the shard speaks TLS"):  # and it said so
                plain.request(Message(ops.HELLO), timeout_s=30)
    finally:
        server.stop()


def test_a_key_given_to_a_tls_shard_without_one_is_refused_at_once(tls_files, scheme):
    """Inside TLS the shard cannot peek at the client's announcement: it says first that it
    uses no key, so the client fails at once, not after its connect timeout."""
    cert, key_pem = tls_files
    server = serve(
        local_address(scheme),
        EchoService(),
        security=WireSecurity(tls_cert=str(cert), tls_key=str(key_pem)),
    )
    try:
        keyed = connect(
            server.address,
            name=f"shard 0 ({server.address})",
            connect_timeout_s=60,
            security=WireSecurity(auth_key=b"x" * 32, tls_ca=str(cert)),
        )
        started = time.monotonic()
        with pytest.raises(AuthenticationError) as info:
            keyed.request(Message(ops.HELLO), timeout_s=60)
        assert time.monotonic() - started < 30  # refused, not left to its timeouts
        assert str(info.value) == (
            f"shard 0 ({server.address}): hello: the shard does not use a job key: start it "
            "with --auth-key-file, or connect without a key"
        )
        anonymous = connect(server.address, name="shard", security=WireSecurity(tls_ca=str(cert)))
        assert anonymous.request(Message(ops.HELLO), timeout_s=30).meta == {"seen": 0}
        assert type(anonymous._channel) is {"tcp": TcpChannel, "shm": ShmChannel}[scheme]
        anonymous.close()
    finally:
        server.stop()


_SPEAKS_TLS = "the shard speaks TLS: give --tls-ca (the CA of the shard's certificate)"
_NO_TLS = (
    "the shard does not speak TLS: drop --tls-ca, or start the shard with --tls-cert and --tls-key"
)


@pytest.mark.parametrize("shard_key", [None, b"s" * 32], ids=["keyless-shard", "keyed-shard"])
def test_tls_on_one_end_only_is_refused_at_once_naming_tls(tls_files, scheme, shard_key, tmp_path):
    """Each end tells the other that it speaks TLS or not, whatever the job keys: the client
    fails at once with TLSMismatchError (not retried), not after the shard's TLS handshake
    timeout or as a lost connection. So does a certificate its CA does not verify."""
    cert, key_pem = tls_files
    other_ca = tmp_path / "other.pem"
    _make_certificate(other_ca, tmp_path / "other-key.pem")
    tls_security = WireSecurity(auth_key=shard_key, tls_cert=str(cert), tls_key=str(key_pem))
    tls_shard = serve(local_address(scheme), EchoService(), security=tls_security)
    plain_shard = serve(
        local_address(scheme), EchoService(), security=WireSecurity(auth_key=shard_key)
    )
    refused = []
    for client_key in (None, b"s" * 32):
        refused += [
            (tls_shard, WireSecurity(auth_key=client_key), re.escape(_SPEAKS_TLS)),
            (plain_shard, WireSecurity(auth_key=client_key, tls_ca=str(cert)), re.escape(_NO_TLS)),
            (
                tls_shard,
                WireSecurity(auth_key=client_key, tls_ca=str(other_ca)),
                rf"certificate verify failed: .+ \(the shard's certificate, checked against "
                rf"--tls-ca {re.escape(str(other_ca))}\)",
            ),
        ]
    try:
        for server, security, said in refused:
            name = f"shard 0 ({server.address})"
            client = connect(server.address, name=name, connect_timeout_s=60, security=security)
            started = time.monotonic()
            with pytest.raises(TLSMismatchError, match=rf"^{re.escape(name)}: hello: {said}$"):
                client.request(Message(ops.HELLO), timeout_s=60)
            assert time.monotonic() - started < 30  # told, not left to its timeouts
            client.close()
        for server, security in [
            (tls_shard, WireSecurity(auth_key=shard_key, tls_ca=str(cert))),
            (plain_shard, WireSecurity(auth_key=shard_key)),
        ]:  # each still serves the clients of its kind
            client = connect(server.address, name="shard", security=security)
            assert client.request(Message(ops.HELLO), timeout_s=30).meta == {"seen": 0}
            assert type(client._channel) is {"tcp": TcpChannel, "shm": ShmChannel}[scheme]
            client.close()
    finally:
        tls_shard.stop()
        plain_shard.stop()
    assert issubclass(TLSMismatchError, AuthenticationError)  # refused as a wrong key is


def test_a_worker_without_the_shards_tls_is_told_which_flag(tls_files, tmp_path):
    cert, key_pem = tls_files
    other_ca = tmp_path / "other.pem"
    _make_certificate(other_ca, tmp_path / "other-key.pem")
    key_file = write_key_file(tmp_path / "job.key")
    tls = ("--tls-cert", str(cert), "--tls-key", str(key_pem))
    shard, address = start_shard(0, 1, "--auth-key-file", str(key_file), *tls)
    try:
        worker = [
            *["worker", "--ps", address, "--rank", "0", "--num-workers", "1", "--steps", "1"],
            *["--auth-key-file", str(key_file), "--retry-timeout", "120"],
        ]
        plain = run_forked(*worker, timeout_s=240)
        other = run_forked(*worker, "--tls-ca", str(other_ca), timeout_s=240)
    finally:
        stop_processes([shard])
    for run in (plain, other):
        assert run.returncode == 2, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and "retrying" not in run.stderr, run.stderr[-2000:]
    assert plain.stderr.strip().splitlines()[-1] == (
        f"distbelief worker: error: shard 0 ({address}): hello: {_SPEAKS_TLS}"
    )
    assert re.fullmatch(
        rf"distbelief worker: error: shard 0 \({re.escape(address)}\): hello: certificate verify "
        rf"failed: .+ \(the shard's certificate, checked against --tls-ca "
        rf"{re.escape(str(other_ca))}\)",
        other.stderr.strip().splitlines()[-1],
    )


def _garbage_frame(rng: random.Random) -> tuple[bytes, bool]:
    """One hostile frame and whether the server keeps the connection open after it."""
    kind = rng.random()
    if kind < 0.6:  # well framed, hostile content: answered with an error, stream stays in sync
        metas = [
            rng.randbytes(rng.randint(0, 40)),
            json.dumps({"tensors": [["float32[0:3]", "float32", [3]]]}).encode(),
            json.dumps({"tensors": [["x", "complex64", [2]]]}).encode(),
            json.dumps({"tensors": [["x", "float32", [-1]]], "seq": "no"}).encode(),
            json.dumps({"specs": [["w", [2], "float32"]], "worker": 5}).encode(),
            json.dumps({"max_wait_s": 1e9, "after_version": -3}).encode(),
        ]
        meta = rng.choice(metas)
        payload = rng.randbytes(rng.choice([0, 4, 12, 64]))
        op = rng.choice([1, 2, 3, 4, 5])
        return HEADER.pack(
            MAGIC, PROTOCOL_VERSION, op, 0, rng.getrandbits(32), len(meta), len(payload)
        ) + meta + payload, True
    if kind < 0.8:  # not our protocol at all
        return rng.randbytes(rng.randint(1, 100)), False
    # truncated: a header promising more than ever comes
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, 3, 0, 1, 10, 1000)
    return header[: rng.randint(1, len(header))] if rng.random() < 0.5 else header + b"{", False


def _fuzz(address: str, num_frames: int, deadline: float) -> int:
    rng = random.Random(1234)
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sent, sock = 0, None
    while sent < num_frames and time.monotonic() < deadline:
        if sock is None:
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.setblocking(False)
        frame, stays_open = _garbage_frame(rng)
        try:
            sock.sendall(frame)
            sock.recv(1 << 16)  # drain error replies so the shard never blocks on us
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            stays_open = False
        sent += 1
        if not stays_open:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return sent


def _fuzz_channel(address: str, num_frames: int) -> int:
    """Hostile frames through the project's own channels; returns how many were answered."""
    rng = random.Random(4321)
    channel, reader, answered = None, None, 0
    try:
        for _ in range(num_frames):
            if channel is None:
                channel = dial(address, timeout_s=5)
                channel.settimeout(5)
                reader = FrameReader(channel)
            frame, stays_open = _garbage_frame(rng)
            try:
                channel.sendall(frame)
                if stays_open:
                    recv_message(reader)  # answered (an echo or an error): still in sync
                    answered += 1
            except OSError:
                stays_open = False
            if not stays_open:
                channel.close()
                channel = None
    finally:
        if channel is not None:
            channel.close()
    return answered


def test_hostile_frames_on_every_channel(scheme):
    service = EchoService()
    server = serve(local_address(scheme), service)
    try:
        answered = _fuzz_channel(server.address, 300)
        assert answered > 100
        client = connect(server.address, name="echo")
        assert client.request(Message(ops.HELLO), timeout_s=5).meta == {"seen": 0}
        client.close()
    finally:
        server.stop()


def _train_and_check(model, optimizer, num_steps, fuzz) -> None:
    """Train while ``fuzz`` runs; the shards must equal initial - lr * (sum of our gradients)."""
    initial = [p.detach().clone() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    fuzz()
    for _ in range(num_steps):
        images, labels = torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        for acc, param in zip(total, model.parameters(), strict=True):
            acc += param.grad
        optimizer.step()
    optimizer.flush()
    optimizer.pull_now()
    for param, start, acc in zip(model.parameters(), initial, total, strict=True):
        torch.testing.assert_close(param, start - 0.1 * acc, atol=1e-5, rtol=0)
    assert [s["num_pushes"] for s in optimizer.client.stats()] == [num_steps] * 2


def test_shard_survives_4000_hostile_frames(shard_cluster):
    addresses = shard_cluster(2, "--server-lr", "0.1")
    model = _model()
    optimizer = DownpourSGD(
        model.parameters(), lr=0.1, model=model, ps=addresses, blocking=True, timeout_s=10
    )
    counts = []

    def fuzz() -> None:
        deadline = time.monotonic() + FUZZ_TIME_LIMIT_S
        counts.extend(_fuzz(address, NUM_FUZZ_FRAMES // 2, deadline) for address in addresses)

    _train_and_check(model, optimizer, 10, fuzz)
    assert sum(counts) == NUM_FUZZ_FRAMES
    optimizer.close()


def test_unauthenticated_clients_are_refused_and_change_nothing(shard_cluster, tmp_path):
    key_file = write_key_file(tmp_path / "job.key")
    addresses = shard_cluster(2, "--server-lr", "0.1", "--auth-key-file", str(key_file))
    model = _model()
    optimizer = DownpourSGD(
        model.parameters(),
        lr=0.1,
        model=model,
        ps=addresses,
        blocking=True,
        timeout_s=10,
        auth_key=read_key_file(key_file),
    )

    def fuzz() -> None:
        deadline = time.monotonic() + FUZZ_TIME_LIMIT_S
        for address in addresses:
            assert _fuzz(address, 200, deadline) == 200
        intruder = ParameterServerClient(addresses, optimizer.specs, timeout_s=2, retry_timeout_s=0)
        with pytest.raises(ProtocolError, match="requires authentication"):
            intruder.stats()
        intruder.close()

    _train_and_check(model, optimizer, 10, fuzz)
    optimizer.close()


def test_a_worker_with_another_jobs_key_file_is_told_which_flag(tmp_path):
    write_key_file(tmp_path / "job.key")
    write_key_file(tmp_path / "other.key")
    shard, address = start_shard(0, 1, "--auth-key-file", str(tmp_path / "job.key"))
    try:
        worker = ["worker", "--ps", address, "--rank", "0", "--num-workers", "1", "--steps", "1"]
        wrong = run_forked(*worker, "--auth-key-file", str(tmp_path / "other.key"), timeout_s=120)
        none = run_forked(*worker, timeout_s=120)
    finally:
        stop_processes([shard])
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    assert (
        wrong.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"the shard refused this job key (--auth-key-file {tmp_path / 'other.key'} is not this "
            "job's key)"
        )
    )
    assert none.returncode == 2, none.stderr[-2000:]
    assert (
        none.stderr.strip()
        .splitlines()[-1]
        .endswith("requires authentication: give the job's key (with --auth-key-file FILE)")
    )
    assert "Traceback" not in wrong.stderr + none.stderr


def _recv_exactly(sock: socket.socket, num_bytes: int) -> bytes:
    data = b""
    while len(data) < num_bytes:
        chunk = sock.recv(num_bytes - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize("design", ["pool", "threads"])
def test_a_plain_socket_client_that_follows_the_readme_gets_in(design, monkeypatch):
    """The handshake and the frame as README's "Wire protocol" spells them, with nothing of
    the project's on the client's side: a right key gets a HELLO answered, a wrong one DBLR."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    key = bytes.fromhex("ab" * 32)
    server = serve(
        "tcp://127.0.0.1:0", EchoService(), design=design, security=WireSecurity(auth_key=key)
    )
    host, port = parse_tcp_address(server.address)

    def handshake(client_key: bytes) -> tuple[socket.socket, bytes]:
        """The connection, and the shard's answer if it is not the proof expected."""
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(b"DBLA")  # first, then read: either design answers it
        assert _recv_exactly(sock, 4) == b"DBLA"
        challenge = _recv_exactly(sock, 32)
        nonce = secrets.token_bytes(32)
        proof = hmac.new(client_key, b"client" + challenge, hashlib.sha256).digest()
        sock.sendall(proof + nonce)
        answer = _recv_exactly(sock, 32)
        expected = hmac.new(client_key, b"server" + nonce, hashlib.sha256).digest()
        return sock, b"" if answer == expected else answer

    try:
        sock, wrong = handshake(key)
        with sock:
            assert wrong == b""
            meta = json.dumps({"hello": "readme"}).encode()
            # magic, version 1, op HELLO [1], flags 0, request id, metadata length, payload length
            sock.sendall(struct.pack("!4sBBHQIQ", b"DBLF", 1, 1, 0, 7, len(meta), 0) + meta)
            magic, version, op, flags, request_id, meta_len, payload_len = struct.unpack(
                "!4sBBHQIQ", _recv_exactly(sock, 28)
            )
            assert (magic, version, op, flags, request_id) == (b"DBLF", 1, 1, 0x1, 7)
            assert json.loads(_recv_exactly(sock, meta_len)) == {"seen": 0}  # EchoService's
            assert payload_len == 0
        sock, refused = handshake(b"x" * 32)
        with sock:
            assert refused == b"DBLR this shard refused the key\n"
            assert sock.recv(1) == b""  # and hangs up
    finally:
        server.stop()


@pytest.mark.parametrize("design", ["pool", "threads"])
def test_peers_without_the_key_take_no_place_under_max_connections(design, monkeypatch):
    """Plain sockets that connect to a keyed shard and never answer its challenge are not
    counted toward --max-connections: key holders still get every place, and the cap still
    refuses the key holder past it."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    security = WireSecurity(auth_key=b"k" * 32)
    server = serve(
        "tcp://127.0.0.1:0", EchoService(), design=design, max_connections=3, security=security
    )
    host, port = parse_tcp_address(server.address)
    hogs: list[socket.socket] = []
    clients = []
    try:
        # Accepted before the clients (the listen backlog is served in order), so each was
        # taken when a key holder arrives.
        hogs = [socket.create_connection((host, port), timeout=30) for _ in range(8)]
        for _ in range(3):
            clients.append(connect(server.address, name="shard 0", security=security))
            assert clients[-1].request(Message(ops.HELLO), timeout_s=30).meta == {"seen": 0}
        assert server.num_connections == 3
        clients.append(connect(server.address, name="shard 0", security=security))
        with pytest.raises(TooManyConnectionsError, match=r"--max-connections 3\)"):
            clients[-1].request(Message(ops.HELLO), timeout_s=30)
    finally:
        for client in clients:
            client.close()
        for hog in hogs:
            hog.close()
        server.stop()


@pytest.mark.parametrize("bound", ["handshakes", "descriptors"])
@pytest.mark.parametrize("design", ["pool", "threads"])
def test_peers_still_in_their_handshake_are_bounded_oldest_closed_first(design, bound, monkeypatch):
    """Past the bound on connections still in their handshake, or once the connections open
    fill the descriptors of the cap and its refusals in flight, the oldest still in its
    handshake is closed at once (not after the handshake time): silent peers hold a bounded
    number of descriptors and threads, and a key holder arriving after them gets in."""
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "tcp")
    if bound == "handshakes":
        monkeypatch.setattr(rpc_server, "_HANDSHAKES_IN_FLIGHT", 4)
    else:  # 3 served + 1 refusal in flight: 4 connections open at most
        monkeypatch.setattr(rpc_server, "_REFUSALS_IN_FLIGHT", 1)
    monkeypatch.setattr(rpc_server, "_HANDSHAKE_TIMEOUT_S", 60.0)  # past _read_to_end's 30 s
    security = WireSecurity(auth_key=b"k" * 32)
    server = serve(
        "tcp://127.0.0.1:0", EchoService(), design=design, max_connections=3, security=security
    )
    host, port = parse_tcp_address(server.address)
    hogs: list[socket.socket] = []
    client = connect(server.address, name="shard 0", security=security)
    try:
        hogs = [socket.create_connection((host, port), timeout=30) for _ in range(12)]
        assert client.request(Message(ops.HELLO), timeout_s=30).meta == {"seen": 0}
        # The 8 oldest made room for the 4 newest hogs (and then the client): each is closed
        # well before its 60 s handshake time.
        for hog in hogs[:8]:
            _read_to_end(hog)
    finally:
        client.close()
        for hog in hogs:
            hog.close()
        server.stop()
