"""Corrupt data files and empty splits: the loaders refuse each with a ValueError that names the
file and what is wrong, a CIFAR-10 pickle cannot run code, and ``distbelief train`` refuses them
in one line (exit 2) before any process starts."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from distbelief.data import cifar10, load_dataset
from distbelief.launch.cli import main
from distbelief.launch.local import LocalCluster
from tests.conftest import CHILD_ENV

CIFAR_FILES = [*cifar10.SPLIT_FILES["train"], *cifar10.SPLIT_FILES["test"]]


def _batch(num_images: int = 2, **fields: object) -> dict:
    """A CIFAR-10 batch dict as the official files hold it, with ``fields`` replaced."""
    batch = {
        b"batch_label": b"a batch",
        b"labels": [i % 10 for i in range(num_images)],
        b"data": np.arange(num_images * 3072, dtype=np.uint8).reshape(num_images, 3072),
    }
    return {**batch, **{key.encode(): value for key, value in fields.items()}}


def _cifar_dir(root: Path, name: str = "data_batch_1", payload: bytes | None = None) -> Path:
    """Valid batch files in root/cifar-10-batches-py, ``name``'s bytes replaced by ``payload``;
    returns that file's path."""
    folder = root / cifar10.BATCHES_DIR
    folder.mkdir(parents=True)
    for file_name in CIFAR_FILES:
        (folder / file_name).write_bytes(pickle.dumps(_batch(), protocol=2))
    if payload is not None:
        (folder / name).write_bytes(payload)
    return folder / name


def _load_cifar(root: Path, split: str = "train"):
    return load_dataset("cifar10", split=split, data_dir=root, download=False)


_GOOD = pickle.dumps(_batch(), protocol=2)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (_GOOD[: len(_GOOD) // 2], "not a valid CIFAR-10 batch file: pickle data was truncated"),
        (b"", "not a valid CIFAR-10 batch file"),
        (b"label,pixels\n3,0 0 0\n", "not a valid CIFAR-10 batch file"),
        (pickle.dumps([1, 2, 3]), "expected a dict (a CIFAR-10 batch), got type list"),
        (pickle.dumps({b"labels": [1]}), "the batch dict lacks b'data'"),
        (pickle.dumps({"data": 1, "labels": 2}), "lacks b'data' and b'labels'"),
        (pickle.dumps(_batch(data=np.zeros((2, 100), np.uint8))), "data of shape (N, 3072)"),
        (pickle.dumps(_batch(data=np.full((2, 3072), 1.5))), "b'data' must be a 2-D uint8"),
        (pickle.dumps(_batch(data=np.full((2, 3072), 1000))), "b'data' must be a 2-D uint8"),
        (pickle.dumps(_batch(data=[[0] * 3072] * 2)), "b'data' must be a 2-D uint8"),
        (pickle.dumps(_batch(labels=[3, 12])), "got 1 outside it (e.g. 12)"),
        (pickle.dumps(_batch(labels=[3, -1])), "got 1 outside it (e.g. -1)"),
        (pickle.dumps(_batch(labels=[3, 10**30])), "b'labels' must be a list of integers"),
        (pickle.dumps(_batch(labels=[0.5, 1.0])), "b'labels' must be a list of integers"),
        (pickle.dumps(_batch(labels=None)), "b'labels' must be a list of integers"),
        (pickle.dumps(_batch(labels=[1])), "got data (2, 3072) and 1 labels"),
    ],
    ids=[
        *("truncated", "empty", "text", "a-list", "no-data", "str-keys", "data-shape"),
        *("data-float", "data-int64", "data-list", "label-12", "label-negative"),
        *("label-huge", "labels-float", "labels-none", "labels-count"),
    ],
)
def test_a_corrupt_cifar10_batch_is_a_value_error_naming_the_file(tmp_path, payload, problem):
    path = _cifar_dir(tmp_path, payload=payload)
    with pytest.raises(ValueError) as info:
        _load_cifar(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def _mark(path: str) -> None:
    """What a crafted pickle calls if the loader unpickles more than plain data."""
    Path(path).write_text("ran")


class _Crafted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return _mark, (str(self.marker),)


def test_a_crafted_cifar10_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    payload = pickle.dumps(_batch(data=_Crafted(marker)), protocol=2)
    path = _cifar_dir(tmp_path / "data", payload=payload)
    with pytest.raises(ValueError, match=r"_mark, which is not plain data") as info:
        _load_cifar(tmp_path / "data")
    assert str(path) in str(info.value)
    assert not marker.exists()


class _Declared:
    """Pickles as ``function(*arguments)``: a call naming a size the file does not hold."""

    def __init__(self, function: object, *arguments: object) -> None:
        self.function, self.arguments = function, arguments

    def __reduce__(self) -> tuple:
        return self.function, self.arguments


_MIB = 1 << 20
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]


@pytest.mark.parametrize(
    ("declared", "problem"),
    [
        (_Declared(np.ndarray, (_MIB, 3072), np.dtype("u1")), "numpy.ndarray called directly"),
        (_Declared(_RECONSTRUCT, np.ndarray, (_MIB, 3072), np.dtype("u1")), f"({_MIB}, 3072)"),
        (_Declared(bytes, 3 * _MIB * 1024), "bytes() with arguments"),
    ],
    ids=["ndarray-call", "reconstruct-shape", "bytes-size"],
)
def test_a_cifar10_pickle_declaring_gigabytes_is_refused_before_allocating(
    tmp_path, declared, problem
):
    # Each call would allocate 3 GiB from a file of a few hundred bytes (a million images, for
    # which a million labels would take a megabyte more), and loading them would touch it all.
    payload = pickle.dumps(_batch(data=declared), protocol=2)
    assert len(payload) < 1000
    path = _cifar_dir(tmp_path, payload=payload)
    with pytest.raises(ValueError) as info:
        _load_cifar(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a valid CIFAR-10 batch file: ") and problem in message


def _python2_batch(labels: list[int], pixels: bytes) -> bytes:
    """A batch pickled as the official archive's are: Python 2 strings (SHORT_BINSTRING), the
    array by numpy 1's names (numpy.core.multiarray._reconstruct), protocol 2."""

    def string(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + string(b"b")
        + b"\x87R(K\x01"
        + b"K"
        + bytes([len(labels)])
        + b"M\x00\x0c\x86cnumpy\ndtype\n"
        + string(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
        + struct.pack("<I", len(pixels))
        + pixels
        + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return (
        b"\x80\x02}("
        + string(b"batch_label")
        + string(b"training batch 1 of 5")
        + string(b"data")
        + array
        + string(b"labels")
        + label_list
        + string(b"filenames")
        + b"]("
        + string(b"a.png")
        + string(b"b.png")
        + b"eu."
    )


def test_the_official_python2_pickles_and_every_protocol_load(tmp_path):
    pixels = bytes(range(256)) * 24  # two images of 3072 bytes
    official = _python2_batch([6, 9], pixels)
    assert pickle.loads(official, encoding="bytes")[b"labels"] == [6, 9]  # the format is right
    _cifar_dir(tmp_path, payload=official)
    dataset = _load_cifar(tmp_path)
    assert dataset.labels[:2].tolist() == [6, 9]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        folder = tmp_path / f"protocol{protocol}"
        _cifar_dir(folder, "test_batch", pickle.dumps(_batch(), protocol=protocol))
        assert _load_cifar(folder, "test").labels.tolist() == [0, 1]


def test_a_cifar10_split_of_no_images_names_its_files(tmp_path):
    _cifar_dir(tmp_path, "test_batch", pickle.dumps(_batch(0), protocol=2))
    with pytest.raises(ValueError, match=r"the CIFAR-10 test split \(test_batch\) holds no"):
        _load_cifar(tmp_path, "test")


# ---- the command line ------------------------------------------------------------------------


@pytest.fixture
def no_process_starts(monkeypatch):
    """The launcher's cluster: its warm-up does nothing, and starting it fails the test."""

    def start(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a process was started")

    monkeypatch.setattr(LocalCluster, "warm_up", classmethod(lambda cls, config: None))
    monkeypatch.setattr(LocalCluster, "__init__", start)


def _movielens(root: Path, num_ratings: int, bad_line: int = 0, bad_user: int = 0) -> Path:
    """``num_ratings`` lines, line ``bad_line`` (1-based; 0: none) with a movie id of x, or
    with a user id of ``bad_user`` where that is given."""
    path = root / "movielens" / "ratings.dat"
    path.parent.mkdir(parents=True)
    lines = [f"{i}::{i}::4::{1000 + i}\n" for i in range(num_ratings)]
    if bad_line:
        movie = bad_line if bad_user else "x"
        lines[bad_line - 1] = f"{bad_user or bad_line}::{movie}::4::1000\n"
    path.write_text("".join(lines))
    return path


def _criteo(root: Path, num_rows: int, bad_line: int = 0) -> Path:
    """``num_rows`` lines, line ``bad_line`` (1-based; 0: none) with a C26 of zz."""
    path = root / "criteo" / "train.txt"
    path.parent.mkdir(parents=True)
    lines = ["1" + "\t1" * 13 + "\t0000abcd" * 26 + "\n"] * num_rows
    if bad_line:
        lines[bad_line - 1] = "1" + "\t1" * 13 + "\t0000abcd" * 25 + "\tzz\n"
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize(
    ("dataset", "write", "problem"),
    [
        ("cifar10", lambda root: _cifar_dir(root, payload=b"junk"), "not a valid CIFAR-10"),
        ("cifar10", lambda root: _cifar_dir(root, "test_batch", b"junk"), "not a valid"),
        ("movielens", lambda root: _movielens(root, 5), "the MovieLens test split"),
        ("criteo", lambda root: _criteo(root, 5), "the Criteo test split"),
        # Past the first lines: the whole file is checked, each split's rows.
        ("movielens", lambda root: _movielens(root, 50, 40), ":40: movie id must be an integer"),
        ("criteo", lambda root: _criteo(root, 50, 30), ":30: C26 must be 8 hex digits"),
        ("criteo", lambda root: _criteo(root, 50, 48), ":48: C26 must be 8 hex digits"),
        # Within the format's int64 but too large for a table of --embedding-dim 16.
        (
            "movielens",
            lambda root: _movielens(root, 200, 10, bad_user=9 * 10**18),
            ":10: user id 9000000000000000000 is too large for a dlrm table",
        ),
    ],
    ids=[
        *("cifar10-train", "cifar10-test", "movielens-empty-test", "criteo-empty-test"),
        *("movielens-malformed-line", "criteo-malformed-train-line", "criteo-malformed-test-line"),
        "movielens-id-too-large-for-a-table",
    ],
)
def test_train_refuses_in_one_line_before_any_process_starts(
    tmp_path, capsys, no_process_starts, dataset, write, problem
):
    path = write(tmp_path / "data")
    model = "mlp" if dataset == "cifar10" else "dlrm"
    argv = ["train", "--dataset", dataset, "--model", model, "--no-download", "--steps", "2"]
    out = tmp_path / "run"
    assert main([*argv, "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"distbelief train: error: {path}") and problem in stderr
    assert stderr.count("\n") == 1 and not out.exists()


def test_an_id_whose_table_left_dense_outgrows_the_memory_is_refused_naming_tables(
    tmp_path, capsys, no_process_starts
):
    """The users' table left out of --tables is built whole on every worker: an id of 10**13
    (a table of 640 TB) failed the worker allocating it, exit 1 with a traceback."""
    path = _movielens(tmp_path / "data", 200, 10, bad_user=10**13)
    argv = ["train", "--dataset", "movielens", "--model", "dlrm", "--tables", "tables.1"]
    argv += ["--no-download", "--steps", "2", "--data-dir", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(
        f"distbelief train: error: {path}:10: user id 10000000000000 makes tables.0, left out of "
        "--tables, a dense parameter of 10000000000001 rows x 16 values x 4 bytes"
    ), stderr
    assert stderr.count("\n") == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("dataset", "write"),
    [("movielens", lambda root: _movielens(root, 50)), ("criteo", lambda root: _criteo(root, 50))],
)
def test_a_batch_larger_than_a_workers_share_of_a_log_is_refused_before_any_process_starts(
    tmp_path, capsys, no_process_starts, dataset, write
):
    """With --steps the launcher counts no examples to plan the steps; the check of the files
    counts the training split's (45 of 50 rows: 22 per worker), so a batch of 32 is a bad flag,
    not a worker that fails once started."""
    write(tmp_path / "data")
    argv = ["train", "--dataset", dataset, "--model", "dlrm", "--steps", "2", "--workers", "2"]
    out = tmp_path / "run"
    assert main([*argv, "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert (
        "error: argument --batch-size: must be <= the 22 training examples of each of the 2 "
        "workers, got 32"
    ) in stderr
    assert not out.exists()


def _mnist(root: Path, num_images: int = 20) -> Path:
    """The four MNIST files, gzipped; returns the training images' path."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        images = struct.pack(">IIII", 0x803, num_images, 28, 28) + bytes(num_images * 784)
        labels = struct.pack(">II", 0x801, num_images) + bytes(num_images)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    return folder / "train-images-idx3-ubyte.gz"


def _without_read_override() -> list[str]:
    """The command prefix that runs a process the way file permissions stop: as is for a user,
    and for root without the capabilities that let it read and search past them (chmod does
    not stop root); skips the test where neither can be had."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop its read-override capabilities")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """``path`` with no permission at all (a file: not readable; a folder: not searchable)."""
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        yield
    finally:
        path.chmod(mode)


_UNREADABLE = {
    "cifar10-train": ("cifar10", lambda root: _cifar_dir(root, "data_batch_3"), ""),
    "cifar10-test": ("cifar10", lambda root: _cifar_dir(root, "test_batch"), ""),
    "mnist": ("mnist", _mnist, ""),
    "criteo": ("criteo", lambda root: _criteo(root, 50), ""),
    "movielens": ("movielens", lambda root: _movielens(root, 50), ""),
    # A folder it cannot look into: the launcher's check of the files names it.
    "movielens-folder": (
        "movielens",
        lambda root: _movielens(root, 50).parent,
        "argument --data-dir: ",
    ),
}
"""Per case: the data set, what writes its files (returning the one made unreadable) and the
flag the line names first."""

_EACH_IN_A_FORK = """
import json, os, sys, traceback
import torch  # what each command imports: once, before the forks
from distbelief.launch.cli import main
for argv, stderr_path in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        code = 1
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()  # as an uncaught one is, with exit 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
"""``distbelief ARGV`` for each (ARGV, stderr file) of its first argument, each in a process
forked from this one once it has imported torch; prints each one's exit code."""


@pytest.fixture(scope="session")
def unreadable_refusals(tmp_path_factory) -> dict[str, tuple[Path, Path, int, str]]:
    """Per case of ``_UNREADABLE``: the file made unreadable, the run folder asked for, the
    exit code and stderr of ``distbelief train`` on it. One process runs them all, each
    command in a process forked from it: a process of its own spent most of its time
    importing torch."""
    prefix = _without_read_override()
    root = tmp_path_factory.mktemp("unreadable")
    commands, cases = [], {}
    with contextlib.ExitStack() as unreadable:
        for case, (dataset, write, _flag) in _UNREADABLE.items():
            path = write(root / case / "data")
            model = {"cifar10": "mlp", "mnist": "mlp"}.get(dataset, "dlrm")
            argv = ["train", "--dataset", dataset, "--model", model, "--no-download"]
            out, stderr_path = root / case / "run", root / f"{case}.stderr"
            argv += ["--steps", "2", "--data-dir", str(root / case / "data"), "--out", str(out)]
            commands.append((argv, str(stderr_path)))
            cases[case] = (path, out, stderr_path)
            unreadable.enter_context(_unreadable(path))
        result = subprocess.run(
            [*prefix, sys.executable, "-c", _EACH_IN_A_FORK, json.dumps(commands)],
            capture_output=True,
            text=True,
            timeout=300,
            env=CHILD_ENV,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    codes = [int(line) for line in result.stdout.split()]
    return {
        case: (path, out, code, stderr_path.read_text())
        for (case, (path, out, stderr_path)), code in zip(cases.items(), codes, strict=True)
    }


@pytest.mark.xdist_group("unreadable_data")  # one test process: the commands are run once
@pytest.mark.parametrize("case", _UNREADABLE)
def test_an_unreadable_data_file_is_refused_in_one_line_naming_it(case, unreadable_refusals):
    """Not a PermissionError traceback (exit 1): a file the job cannot read is a bad input,
    as a corrupt one is."""
    path, out, returncode, stderr = unreadable_refusals[case]
    flag = _UNREADABLE[case][2]
    assert returncode == 2, stderr[-3000:]
    denied = path / "ratings.dat" if flag else path
    assert stderr.splitlines()[-1] == (
        f"distbelief train: error: {flag}{denied}: Permission denied"
    ), stderr[-3000:]
    assert not out.exists()


def test_load_dataset_names_a_file_it_cannot_read(tmp_path):
    prefix = _without_read_override()
    path = _mnist(tmp_path)
    script = (
        "import sys\n"
        "from distbelief.data import load_dataset\n"
        "try:\n"
        "    load_dataset('mnist', split='train', data_dir=sys.argv[1], download=False)\n"
        "except ValueError as e:\n"
        "    print(f'ValueError: {e}')\n"
    )
    with _unreadable(path):
        result = subprocess.run(
            [*prefix, sys.executable, "-c", script, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env=CHILD_ENV,
        )
    assert result.stdout == f"ValueError: {path}: Permission denied\n", result.stderr[-3000:]


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--ps", "tcp://127.0.0.1:1", "--once"],
        [
            *("worker", "--ps", "tcp://127.0.0.1:1", "--rank", "0", "--num-workers", "1"),
            "--steps",
            "2",
        ],
    ],
    ids=["eval", "worker"],
)
def test_eval_and_worker_name_the_line_of_a_movielens_id_too_large(tmp_path, capsys, command):
    """They have no launcher to check the file first: the id is named by file and line as
    train's check names it, not as a table torch cannot size."""
    path = _movielens(tmp_path / "data", 200, 10, bad_user=9 * 10**18)
    argv = [*command, "--model", "dlrm", "--dataset", "movielens"]
    assert main([*argv, "--data-dir", str(tmp_path / "data")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(
        f"distbelief {command[0]}: error: {path}:10: user id 9000000000000000000 is too large "
        "for a dlrm table"
    )
    assert stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("dataset", "where"),
    [
        ("cifar10", "cifar-10-batches-py/test_batch"),
        ("mnist", "mnist/t10k-images-idx3-ubyte"),
        ("movielens", "movielens/ratings.dat"),
    ],
)
@pytest.mark.parametrize("download", [False, True])
def test_load_dataset_names_a_folder_where_a_data_file_goes(tmp_path, dataset, where, download):
    """Not "lacks test_batch" or "not found" (nor, allowed to download, a file fetched beside
    the folder): the file is there, as a folder."""
    folder = tmp_path / where
    folder.mkdir(parents=True)
    with pytest.raises(ValueError) as caught:
        load_dataset(dataset, split="test", data_dir=tmp_path, download=download)
    assert str(caught.value) == f"{folder} is a folder, not a file"
    assert sorted(path.name for path in folder.parent.iterdir()) == [folder.name]


def test_a_resume_from_another_folder_says_a_relative_data_dir_is_read_from_there(
    tmp_path, monkeypatch, capsys
):
    """config.json keeps --data-dir as typed: resumed from another folder, the files were
    "missing" with no word of why, and --data-dir is refused on a resume."""
    from tests.conftest import run_cli, run_main

    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _mnist(tmp_path / "start" / "d")
    monkeypatch.chdir(tmp_path / "start")
    argv = ["--dataset", "mnist", "--model", "mlp", "--data-dir", "d", "--no-download"]
    argv += ["--steps", "2", "--batch-size", "8", "--workers", "1", "--shards", "1", "--no-eval"]
    argv += ["--no-plots"]
    trained = run_cli("train", *argv, "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    monkeypatch.chdir(tmp_path / "elsewhere")
    refused = run_main("train", "--resume", str(tmp_path / "run"), capsys=capsys)
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.splitlines()[-1]
    assert last.startswith("distbelief train: error: data.data_dir (in "), last
    assert last.endswith(
        f"(a relative --data-dir is read from the folder the resume runs in, "
        f"{tmp_path / 'elsewhere'}: resume from the folder the run started in)"
    ), last
