"""Key files and the mutual challenge-response, over a socketpair."""

import os
import socket
import threading

import pytest

from distbelief.errors import ProtocolError
from distbelief.wire.security import (
    accept_peer,
    authenticate_to_server,
    generate_key,
    read_key_file,
    write_key_file,
)


def test_key_file_round_trip_and_owner_only(tmp_path):
    path = write_key_file(tmp_path / "job.key")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(read_key_file(path)) == 32
    with pytest.raises(ValueError, match="already exists"):
        write_key_file(path)


def test_key_file_open_to_others_is_refused(tmp_path):
    path = write_key_file(tmp_path / "job.key")
    path.chmod(0o644)
    with pytest.raises(ValueError, match=r"job\.key is readable by others"):
        read_key_file(path)


@pytest.mark.parametrize(("content", "match"), [("zz", "not a hex key"), ("abcd", "too short")])
def test_bad_key_files_are_named(tmp_path, content, match):
    path = tmp_path / "bad.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=match):
        read_key_file(path)
    with pytest.raises(ValueError, match=r"missing\.key"):
        read_key_file(tmp_path / "missing.key")


def _handshake(server_key: bytes, client_key: bytes) -> tuple[list, list]:
    server_sock, client_sock = socket.socketpair()
    results: dict[str, list] = {"server": [], "client": []}

    def serve() -> None:
        try:
            accept_peer(server_sock, server_key, timeout_s=2)
            results["server"].append("ok")
        except (ProtocolError, OSError) as e:
            results["server"].append(e)
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        authenticate_to_server(client_sock, client_key, timeout_s=2)
        results["client"].append("ok")
    except (ProtocolError, OSError) as e:
        results["client"].append(e)
    thread.join(5)
    client_sock.close()
    server_sock.close()
    return results["server"], results["client"]


def test_same_key_authenticates_both_ways():
    key = generate_key()
    assert _handshake(key, key) == (["ok"], ["ok"])


def test_wrong_key_is_refused_on_both_sides():
    server, client = _handshake(generate_key(), generate_key())
    assert isinstance(server[0], ProtocolError) and "failed authentication" in str(server[0])
    assert isinstance(client[0], ProtocolError) and "refused this job key" in str(client[0])
