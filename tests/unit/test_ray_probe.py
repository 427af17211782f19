"""The probe of a Ray head's address against servers on 127.0.0.1 that are not one (an HTTP/1
server, a listener that never answers, one that hangs up, an HTTP/2 server that never answers
the call) and against servers that answer as Ray's do (replies recorded from Ray 2.60's GCS and
Ray Client server): each is told apart within the probe's time, with no Ray running."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from distbelief.launch.ray_probe import (
    GCS_METHOD,
    GRPC_UNAUTHENTICATED,
    GRPC_UNIMPLEMENTED,
    GcsAnswer,
    ask_gcs,
)

TIMEOUT_S = 2.0
"""The probe's limit where the peer is meant never to answer in time."""
ANSWER_TIMEOUT_S = 30.0
"""Its limit where the peer answers (or hangs up): only a failing run waits this long, and a
busy machine's late answer is not taken for silence."""

# A gRPC server's first frames: SETTINGS, WINDOW_UPDATE, the ACK of the client's SETTINGS.
_GREETING = bytes.fromhex(
    "000018040000000000000400400000000500400000000600004000fe0300000001"
    "000004080000000000003f0001"
    "000000040100000000"
)


def _frame(kind: int, flags: int, payload: bytes, stream: int = 1) -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
    return header + payload


_HEADERS, _DATA, _CONTINUATION = 0x1, 0x0, 0x9
_END_STREAM, _END_HEADERS, _PADDED = 0x1, 0x4, 0x8
_CONTENT_TYPE = b"\x88@\x0ccontent-type\x10application/grpc"  # :status 200, then a literal
_GCS_ANSWERS = (
    _frame(_HEADERS, _END_HEADERS, _CONTENT_TYPE)
    + _frame(_DATA, 0, b"\x00\x00\x00\x00\x02\x0a\x00")
    + _frame(_HEADERS, _END_HEADERS | _END_STREAM, b"@\x0bgrpc-status\x010")
)
_GCS_REFUSES_THE_TOKEN = _frame(
    _HEADERS,
    _END_HEADERS | _END_STREAM,
    _CONTENT_TYPE + b"\x00\x0bgrpc-status\x0216\x00\x0cgrpc-message>"
    b"InvalidAuthToken: Authentication token is missing or incorrect",
)
_RAY_CLIENT_SERVER = _frame(
    _HEADERS,
    _END_HEADERS | _END_STREAM,
    _CONTENT_TYPE + b"@\x0bgrpc-status\x0212\x00\x0cgrpc-message\x11Method not found!",
)


@pytest.fixture
def server() -> Iterator[Callable[[Callable[[socket.socket], None]], tuple[int, list[bytes]]]]:
    """Starts a listener on 127.0.0.1 whose one connection ``talk`` handles; returns its port
    and what the probe sent (once ``talk`` has read it)."""
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(talk: Callable[[socket.socket], None]) -> tuple[int, list[bytes]]:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        received: list[bytes] = []

        def serve() -> None:
            with listener.accept()[0] as connection:
                connection.settimeout(10)
                received.append(_read_request(connection))
                talk(connection)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return listener.getsockname()[1], received

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(10)


def _read_request(connection: socket.socket) -> bytes:
    """The probe's bytes: the preface, its SETTINGS, its HEADERS and DATA (which ends it)."""
    data = b""
    while not data.endswith(b"\x00\x00\x00\x00\x00"):
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _answer(reply: bytes) -> Callable[[socket.socket], None]:
    def talk(connection: socket.socket) -> None:
        connection.sendall(_GREETING + reply)
        connection.recv(4096)  # the probe's SETTINGS ACK, or its end

    return talk


def test_a_ray_head_answers_and_gets_the_token(server):
    port, received = server(_answer(_GCS_ANSWERS))
    token = "t" * 300  # longer than one byte's length prefix holds
    answer = ask_gcs(
        "127.0.0.1", port, headers={"Authorization": f"Bearer {token}"}, timeout_s=ANSWER_TIMEOUT_S
    )
    assert answer == GcsAnswer(0, "")
    assert received[0].startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert GCS_METHOD.encode() in received[0]
    # HPACK's length of 307: 127 in the prefix, then 180 in 7-bit groups.
    assert b"\x0dauthorization\x7f\xb4\x01Bearer " + token.encode() in received[0]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            _GCS_REFUSES_THE_TOKEN,
            GcsAnswer(
                GRPC_UNAUTHENTICATED,
                "InvalidAuthToken: Authentication token is missing or incorrect",
            ),
        ),
        (_RAY_CLIENT_SERVER, GcsAnswer(GRPC_UNIMPLEMENTED, "Method not found!")),
    ],
    ids=["gcs-without-the-token", "ray-client-server"],
)
def test_refusals_of_the_call_are_read(server, reply, expected):
    port, _ = server(_answer(reply))
    assert ask_gcs("127.0.0.1", port, headers={}, timeout_s=ANSWER_TIMEOUT_S) == expected


def test_headers_split_padded_and_indexed_are_read(server):
    # A padded HEADERS frame, its block's end in a CONTINUATION frame; the status given as a
    # reference to the dynamic table entry an earlier literal made.
    first = b"@\x0bgrpc-status\x0212"
    reply = _frame(_HEADERS, _PADDED | _END_STREAM, b"\x03" + first[:5] + b"\x00\x00\x00")
    reply += _frame(_CONTINUATION, _END_HEADERS, first[5:] + b"\xbe")
    port, _ = server(_answer(reply))
    assert ask_gcs("127.0.0.1", port, headers={}, timeout_s=ANSWER_TIMEOUT_S).status == 12


def test_an_http1_server_is_no_ray_head():
    http_server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=http_server.handle_request, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="it answered, but not as a gRPC server: '"):
            ask_gcs("127.0.0.1", http_server.server_port, headers={}, timeout_s=ANSWER_TIMEOUT_S)
        assert time.monotonic() - started < ANSWER_TIMEOUT_S
    finally:
        thread.join(10)
        http_server.server_close()


def test_a_listener_that_never_answers_is_given_up_on_in_time():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # never accepts
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="accepted the connection but sent nothing"):
            ask_gcs("127.0.0.1", listener.getsockname()[1], headers={}, timeout_s=TIMEOUT_S)
        assert time.monotonic() - started < TIMEOUT_S + 5


def test_a_server_that_hangs_up_is_no_ray_head(server):
    port, _ = server(lambda connection: None)
    with pytest.raises(ConnectionError, match="sent nothing before it closed the connection"):
        ask_gcs("127.0.0.1", port, headers={}, timeout_s=ANSWER_TIMEOUT_S)


def test_garbage_is_shown_as_seen(server):
    port, _ = server(lambda connection: connection.sendall(b"hello\r\nworld"))
    with pytest.raises(ConnectionError, match="not as a gRPC server: 'hello'"):
        ask_gcs("127.0.0.1", port, headers={}, timeout_s=ANSWER_TIMEOUT_S)


def test_an_http2_server_that_never_answers_the_call_is_given_up_on_in_time(server):
    done = threading.Event()
    port, _ = server(lambda connection: (connection.sendall(_GREETING), done.wait(30)))
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionError, match="speaks HTTP/2 but did not answer"):
            ask_gcs("127.0.0.1", port, headers={}, timeout_s=TIMEOUT_S)
    finally:
        done.set()
    assert time.monotonic() - started < TIMEOUT_S + 5


def test_nothing_listening_is_the_sockets_error():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        ask_gcs("127.0.0.1", port, headers={}, timeout_s=ANSWER_TIMEOUT_S)


def test_a_head_that_speaks_tls_is_only_checked_to_accept_connections(monkeypatch):
    from distbelief.errors import ConfigFieldError
    from distbelief.launch.ray_session import _check_head_answers

    monkeypatch.setenv("RAY_USE_TLS", "1")
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the probe's HTTP/2 is no TLS
        _check_head_answers(f"127.0.0.1:{listener.getsockname()[1]}")
        port = listener.getsockname()[1]
    with pytest.raises(ConfigFieldError, match=f"no Ray head answers at 127.0.0.1:{port}"):
        _check_head_answers(f"127.0.0.1:{port}")


def test_an_ipv6_head_address_is_looked_up_without_its_brackets():
    from distbelief.errors import ConfigFieldError
    from distbelief.launch.ray_session import _check_head_answers

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as listener:
            port = listener.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    with pytest.raises(ConfigFieldError) as refused:  # nothing listens there any more
        _check_head_answers(f"[::1]:{port}")
    assert f"no Ray head answers at [::1]:{port} (Connection refused)" in str(refused.value)


@pytest.mark.parametrize("text", ["0", "-5", "soon", "nan", "1e300"])
def test_a_malformed_placement_timeout_is_refused_naming_the_variable(monkeypatch, text):
    from distbelief.launch.ray_placement import placement_timeout_s

    monkeypatch.setenv("DISTBELIEF_PLACEMENT_TIMEOUT_S", text)
    with pytest.raises(ValueError, match=f"^DISTBELIEF_PLACEMENT_TIMEOUT_S {text!r}: "):
        placement_timeout_s()


def test_the_placement_timeout_is_60_s_unless_the_variable_says_otherwise(monkeypatch):
    from distbelief.launch.ray_placement import placement_timeout_s

    monkeypatch.delenv("DISTBELIEF_PLACEMENT_TIMEOUT_S", raising=False)
    assert placement_timeout_s() == 60.0
    monkeypatch.setenv("DISTBELIEF_PLACEMENT_TIMEOUT_S", "12.5")
    assert placement_timeout_s() == 12.5


# An HTTP/2 server that is no gRPC server (a web server or proxy on the port): its reply to the
# call is ":status 404" (HPACK's static entry 13), then its own fields, Huffman-coded, recorded.
_HTTP2_NOT_FOUND = _frame(
    _HEADERS,
    _END_HEADERS | _END_STREAM,
    b"\x8dv\x84\xea[=ya\x96\xdc4\xfd(\x06\xd4\xbeR( \t\xc5\x02\xcd\xc0;p\r\xa9\x8bF\xff",
)


@pytest.mark.parametrize(
    "reply",
    [_HTTP2_NOT_FOUND, _frame(_HEADERS, _END_HEADERS | _END_STREAM, b"\x08\x03503")],
    ids=["indexed-404", "literal-503"],
)
def test_an_http2_server_answering_another_http_status_is_no_ray_head(server, reply):
    port, _ = server(_answer(reply))
    with pytest.raises(ConnectionError, match=r"HTTP status (404|503), not as a gRPC server"):
        ask_gcs("127.0.0.1", port, headers={}, timeout_s=ANSWER_TIMEOUT_S)


def test_the_address_checked_is_the_one_rays_client_dials(monkeypatch):
    # Ray's client dials 127.0.0.1 as this machine's network address (unless Ray runs as a
    # single-machine instance): a head listening on loopback only answers the typed address,
    # not the one dialed, where Ray's client waited without end.
    pytest.importorskip("ray")
    import ray._private.services

    from distbelief.errors import ConfigFieldError
    from distbelief.launch import ray_session

    dialed: list[tuple[str, int]] = []

    def refused(host: str, port: int, **_: object) -> GcsAnswer:
        dialed.append((host, port))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(ray_session, "ask_gcs", refused)
    monkeypatch.setattr(
        ray._private.services,
        "canonicalize_bootstrap_address",
        lambda address: address.replace("127.0.0.1", "192.0.2.7"),
    )
    with pytest.raises(ConfigFieldError) as refusal:
        ray_session.check_address("127.0.0.1:6379")
    assert dialed == [("192.0.2.7", 6379)]
    assert refusal.value.field == "cluster.ray_address"
    assert "no Ray head answers at 127.0.0.1:6379, which Ray dials as 192.0.2.7:6379 " in str(
        refusal.value
    )


def test_off_a_terminal_ray_prints_plainly_and_a_refused_job_leaves_the_environment(monkeypatch):
    """The settings that make Ray print the actors' lines whole and without colour codes are
    set off a terminal (pytest's captured stderr is none), keeping a user's own; a job refused
    at its address check takes them back: a script that calls ``train`` and then Ray itself
    finds its environment as it was."""
    pytest.importorskip("ray")
    import os

    from distbelief.config import JobConfig
    from distbelief.errors import ConfigFieldError
    from distbelief.launch.ray_cluster import RayCluster
    from distbelief.launch.ray_session import plain_lines_off_a_terminal, restore_environment

    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's own
    plain_lines_off_a_terminal()
    assert os.environ["RAY_DEDUP_LOGS"] == "0" and os.environ["RAY_COLOR_PREFIX"] == "1"
    restore_environment()
    assert "RAY_DEDUP_LOGS" not in os.environ and os.environ["RAY_COLOR_PREFIX"] == "1"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]  # closed again: nothing listens there
    config = JobConfig.from_fields(
        {"cluster.engine": "ray", "cluster.ray_address": f"127.0.0.1:{port}"}
    )
    with pytest.raises(ConfigFieldError, match="no Ray head answers"):
        RayCluster.warm_up(config)
    assert "RAY_DEDUP_LOGS" not in os.environ


@pytest.mark.parametrize("users_token", [None, "ab" * 32])
def test_the_embedded_instance_gets_a_fresh_token_whatever_the_user_set(monkeypatch, users_token):
    """RAY_AUTH_MODE=token, set to join one's clusters, had the embedded instance read the
    home folder's token file (the clusters' token), or write one there; afterwards the
    user's settings are as they were."""
    pytest.importorskip("ray")
    import os

    from distbelief.launch.ray_session import prepare_embedded, restore_environment

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    if users_token is None:
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_TOKEN", users_token)
    prepare_embedded()
    try:
        token = os.environ["RAY_AUTH_TOKEN"]
        assert os.environ["RAY_AUTH_MODE"] == "token"
        assert len(token) == 64 and token != users_token
    finally:
        restore_environment()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ.get("RAY_AUTH_TOKEN") == users_token


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        # Ray started an instance of its own for it: on every interface, left running.
        ("local", "give --ray-address local for an instance of the job's own"),
        ("foo", "not HOST:PORT of a Ray head"),
        ("ray://10.0.0.1:10001", "a Ray Client address"),
    ],
)
def test_auto_refuses_a_ray_address_variable_that_is_no_heads_address(monkeypatch, value, problem):
    from distbelief.errors import ConfigFieldError
    from distbelief.launch.ray_session import check_address

    monkeypatch.setenv("RAY_ADDRESS", value)
    with pytest.raises(ConfigFieldError) as refusal:
        check_address("auto")
    assert refusal.value.field == "cluster.ray_address"
    assert refusal.value.problem.startswith(f"auto reads RAY_ADDRESS={value!r}: {problem}")


def test_auto_takes_a_ray_address_variable_of_auto(monkeypatch):
    """RAY_ADDRESS=auto is Ray's word for the cluster on this machine: auto's, not refused."""
    from distbelief.launch import ray_session

    monkeypatch.setenv("RAY_ADDRESS", "auto")
    ray_session._check_ray_address_variable()  # no refusal
