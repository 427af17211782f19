"""Key files and the mutual challenge-response, over a socketpair."""

import os
import socket
import threading
from pathlib import Path

import pytest

from distbelief.errors import AuthenticationError, ProtocolError
from distbelief.wire.security import (
    ANSWER_BYTES,
    accept_peer,
    authenticate_to_server,
    generate_key,
    read_key_file,
    send_challenge,
    write_key_file,
)


def test_key_file_round_trip_and_owner_only(tmp_path):
    path = write_key_file(tmp_path / "job.key")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(read_key_file(path)) == 32
    with pytest.raises(ValueError, match="already exists"):
        write_key_file(path)


def _files_under(folder) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("/proc/job.key", "key file /proc/job.key: cannot write in /proc: "),
        ("afile/job.key", "key file {tmp}/afile/job.key: {tmp}/afile is not a folder"),
        ("afile/new/job.key", "key file {tmp}/afile/new/job.key: {tmp}/afile is not a folder"),
        (
            "dangling.key",
            "key file {tmp}/dangling.key already exists (a link to {tmp}/nowhere): not "
            "overwriting it",
        ),
        ("/proc/new/job.key", "key file /proc/new/job.key: cannot write in /proc/new: "),
        ("keys/", "key file {tmp}/keys/: names a folder; give the file's name in it"),
        ("afolder", "key file {tmp}/afolder: is a folder; give the file's name in it"),
    ],
    ids=[
        *("unwritable", "under-a-file", "deep-under-a-file", "dangling-link", "unmakeable"),
        *("a-folder", "an-existing-folder"),
    ],
)
def test_keygen_that_cannot_write_its_file_says_why_in_one_line(tmp_path, capsys, where, said):
    from distbelief.launch.cli import main

    (tmp_path / "afile").write_text("")
    (tmp_path / "afolder").mkdir()
    (tmp_path / "dangling.key").symlink_to(tmp_path / "nowhere")
    before = _files_under(tmp_path)
    path = where if where.startswith("/") else f"{tmp_path}/{where}"  # keeps a trailing slash
    assert main(["keygen", path]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"distbelief keygen: error: {said.format(tmp=tmp_path)}"), err
    assert _files_under(tmp_path) == before  # no temporary file, no folder, nothing written
    assert not os.path.exists("/proc/new")


def test_keygen_makes_the_missing_folders_of_a_new_file(tmp_path, capsys):
    from distbelief.launch.cli import main

    path = tmp_path / "keys" / "run" / "job.key"
    assert main(["keygen", str(path)]) == 0
    assert len(read_key_file(path)) == 32
    assert _files_under(tmp_path) == ["keys", "keys/run", "keys/run/job.key"]


def test_key_file_open_to_others_is_refused(tmp_path):
    path = write_key_file(tmp_path / "job.key")
    path.chmod(0o644)
    with pytest.raises(ValueError, match=r"job\.key is open to others: chmod 600 "):
        read_key_file(path)
    path.chmod(0o640)
    with pytest.raises(ValueError, match=r"job\.key is open to its group: chmod 600 "):
        read_key_file(path)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_key_file_that_is_no_regular_file_is_refused_without_opening_it(tmp_path, kind):
    """A named pipe would hold the open until a writer comes (never, for a file named by
    mistake); a device is no key either."""
    if kind == "fifo":
        path = tmp_path / "job.key"
        os.mkfifo(path, 0o600)
    else:
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero")
    with pytest.raises(ValueError, match=rf"^key file {path}: not a regular file \(make one"):
        read_key_file(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("zz", r"bad\.key: not a hex key"),
        ("abcd", r"bad\.key: key of 2 bytes is too short"),
        (b"\xa8\x1f" * 32, r"bad\.key: not a hex key"),  # a binary file, not UTF-8
        ("ab" * 4096, r"bad\.key: over 4096 bytes, too long"),  # a file named by mistake
    ],
    ids=["not-hex", "short", "binary", "too-long"],
)
def test_bad_key_files_are_named(tmp_path, content, match):
    path = tmp_path / "bad.key"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=match):
        read_key_file(path)
    with pytest.raises(ValueError, match=r"missing\.key"):
        read_key_file(tmp_path / "missing.key")


def _handshake(server_key: bytes, client_key: bytes) -> tuple[list, list]:
    # Each side is answered or refused at once; the bounds only end a failing run (a busy
    # machine may leave the serving thread unscheduled for seconds).
    server_sock, client_sock = socket.socketpair()
    results: dict[str, list] = {"server": [], "client": []}

    def serve() -> None:
        try:
            accept_peer(server_sock, server_key, timeout_s=30)
            results["server"].append("ok")
        except (ProtocolError, OSError) as e:
            results["server"].append(e)
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        authenticate_to_server(client_sock, client_key, timeout_s=30)
        results["client"].append("ok")
    except (ProtocolError, OSError) as e:
        results["client"].append(e)
    thread.join(60)
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


def test_a_shard_that_dies_after_the_answer_is_a_lost_connection_not_a_refusal():
    server_sock, client_sock = socket.socketpair()

    def die_after_the_answer() -> None:  # as a shard killed at that moment
        send_challenge(server_sock)
        server_sock.recv(ANSWER_BYTES, socket.MSG_WAITALL)
        server_sock.close()

    thread = threading.Thread(target=die_after_the_answer)
    thread.start()
    with pytest.raises(OSError) as caught:
        authenticate_to_server(client_sock, generate_key(), timeout_s=10)
    thread.join(10)
    client_sock.close()
    # Retried by the caller as any lost connection, not reported as a key the shard refused.
    assert not isinstance(caught.value, AuthenticationError)


_WORKER = ["worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"]
_SHARD = ["ps", "--shard-id", "0", "--num-shards", "1", "--no-auth"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([*_WORKER, "--tls-ca", "job.key"], r"--tls-ca job\.key: not a PEM CA bundle"),
        (
            [*_SHARD, "--tls-cert", "job.key", "--tls-key", "job.key"],
            r"^--tls-cert job\.key: not a PEM certificate \(",
        ),
    ],
    ids=["ca", "cert"],
)
def test_tls_files_that_are_not_pem_are_named_before_any_connection(
    tmp_path, monkeypatch, flags, message
):
    from distbelief.launch.cli import parse_args
    from distbelief.launch.flags import security_from_args

    monkeypatch.chdir(tmp_path)
    write_key_file("job.key")
    with pytest.raises(ValueError, match=message):
        security_from_args(parse_args(flags))


@pytest.mark.parametrize(
    "flags",
    [
        [*_WORKER, "--tls-ca", "pem"],
        [*_SHARD, "--tls-cert", "pem", "--tls-key", "key.pem"],
        [*_SHARD, "--tls-cert", "key.pem", "--tls-key", "pem"],
    ],
    ids=["ca", "cert", "key"],
)
def test_a_tls_flag_naming_a_folder_says_it_is_a_folder(tmp_path, monkeypatch, flags):
    from distbelief.launch.cli import parse_args
    from distbelief.launch.flags import security_from_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pem").mkdir()
    (tmp_path / "key.pem").write_text("not read: the folder is refused first")
    flag = flags[flags.index("pem") - 1]
    with pytest.raises(ValueError, match=rf"^{flag} pem: is a folder, not a PEM file$"):
        security_from_args(parse_args(flags))


def test_downpour_takes_a_key_files_text_as_the_key_and_names_bad_settings(tmp_path, monkeypatch):
    from distbelief.optim.connection_settings import TIMEOUT_ENV, _key_bytes, request_timeout_s

    path = write_key_file(tmp_path / "job.key")
    key = read_key_file(path)
    assert _key_bytes(path.read_text()) == key  # the file's text, as str
    assert _key_bytes(path.read_bytes()) == key  # or as bytes
    assert _key_bytes(key) == key and _key_bytes(None) is None
    with pytest.raises(ValueError, match="auth_key: a str must be a hex key"):
        _key_bytes("not hex")
    for empty in ("", b"", "\n", b" \n"):
        with pytest.raises(ValueError, match=r"^auth_key is empty: give the job's key"):
            _key_bytes(empty)
    monkeypatch.setenv(TIMEOUT_ENV, "abc")
    with pytest.raises(ValueError, match="DISTBELIEF_TIMEOUT_S 'abc': must be a finite number > 0"):
        request_timeout_s(None)
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert request_timeout_s(None) == 2.5


def test_downpour_names_the_variable_a_bad_address_or_key_file_came_from(tmp_path, monkeypatch):
    from distbelief.optim.connection_settings import (
        AUTH_KEY_FILE_ENV,
        PS_ADDRESS_ENV,
        _key_from_environment,
        ps_addresses,
    )

    monkeypatch.setenv(PS_ADDRESS_ENV, "bogus")
    with pytest.raises(ValueError, match=r"^DISTBELIEF_PS: address 'bogus' is not of the form"):
        ps_addresses(None)
    monkeypatch.setenv(PS_ADDRESS_ENV, "tcp://127.0.0.9:1,,tcp://127.0.0.9:2")
    with pytest.raises(ValueError, match=r"^DISTBELIEF_PS: the list .* has an empty item$"):
        ps_addresses(None)
    monkeypatch.setenv(AUTH_KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match=r"^DISTBELIEF_AUTH_KEY_FILE: key file .*missing.key: No"):
        _key_from_environment()
    monkeypatch.setenv(PS_ADDRESS_ENV, "tcp://127.0.0.9:1")
    monkeypatch.setenv("DISTBELIEF_TRANSPORT", "bogus")
    with pytest.raises(ValueError, match=r"^DISTBELIEF_TRANSPORT 'bogus': must be one of auto"):
        ps_addresses(None)


def test_keygen_names_a_path_with_a_space_as_the_shell_reads_it(tmp_path, capsys):
    from distbelief.launch.cli import main

    path = tmp_path / "my keys" / "job.key"
    assert main(["keygen", str(path)]) == 0
    assert f"pass it with --auth-key-file '{path}'" in capsys.readouterr().out
