"""Unit tests for distbelief.data, on tiny files written in the real CIFAR-10 and IDX formats."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from distbelief.config import CLICK_LOG_DATASETS, DATASET_NAMES
from distbelief.data import (
    ArrayDataset,
    cifar10,
    iterate_batches,
    load_dataset,
    mnist,
    worker_indices,
)
from distbelief.data.download import download_file, extract_tar
from distbelief.data.files import FIXED_TRAIN_EXAMPLES
from distbelief.errors import DatasetUnavailableError
from tests.conftest import CHILD_ENV

NUM_PER_CIFAR_BATCH = 3


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _unnormalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return images * std_t + mean_t


# ---- CIFAR-10 --------------------------------------------------------------------------------


def _cifar_batches() -> dict[str, tuple[np.ndarray, list[int]]]:
    """Distinct random uint8 pixels and labels for each of the six official batch files."""
    rng = np.random.default_rng(0)
    names = [*cifar10.SPLIT_FILES["train"], *cifar10.SPLIT_FILES["test"]]
    return {
        name: (
            rng.integers(0, 256, size=(NUM_PER_CIFAR_BATCH, 3072), dtype=np.uint8),
            rng.integers(0, 10, size=NUM_PER_CIFAR_BATCH).tolist(),
        )
        for name in names
    }


def _write_cifar(root: Path, batches: dict) -> None:
    batches_dir = root / cifar10.BATCHES_DIR
    batches_dir.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        payload = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        with open(batches_dir / name, "wb") as f:
            pickle.dump(payload, f, protocol=2)


def _check_cifar(dataset: ArrayDataset, batches: dict, split: str) -> None:
    names = cifar10.SPLIT_FILES[split]
    assert len(dataset) == NUM_PER_CIFAR_BATCH * len(names)
    assert dataset.images.dtype == torch.float32 and dataset.labels.dtype == torch.int64
    assert dataset.input_shape == (3, 32, 32) and dataset.num_classes == 10
    raw = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32)
    pixels = _unnormalize(dataset.images, cifar10.CIFAR10_MEAN, cifar10.CIFAR10_STD)
    torch.testing.assert_close(pixels * 255, torch.from_numpy(raw).float(), atol=1e-3, rtol=0)
    assert dataset.labels.tolist() == [label for n in names for label in batches[n][1]]


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_loads_official_pickles(tmp_path, split):
    batches = _cifar_batches()
    _write_cifar(tmp_path, batches)
    dataset = load_dataset("cifar10", split=split, data_dir=tmp_path, download=False)
    _check_cifar(dataset, batches, split)


def test_a_cifar10_batch_of_another_structure_is_named(tmp_path):
    batches = _cifar_batches()
    data, _ = batches["test_batch"]
    batches["test_batch"] = (data, ["cat"] * NUM_PER_CIFAR_BATCH)  # labels that are not ints
    _write_cifar(tmp_path, batches)
    with pytest.raises(ValueError, match=r"test_batch: b'labels' must be a list of integers"):
        load_dataset("cifar10", split="test", data_dir=tmp_path, download=False)


def test_cifar10_download_verifies_and_extracts(tmp_path, monkeypatch):
    batches = _cifar_batches()
    _write_cifar(tmp_path / "src", batches)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / cifar10.BATCHES_DIR, arcname=cifar10.BATCHES_DIR)
    monkeypatch.setattr(cifar10, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", _md5(archive))
    data_dir = tmp_path / "data"
    dataset = load_dataset("cifar10", split="train", data_dir=data_dir, download=True)
    _check_cifar(dataset, batches, "train")
    assert (data_dir / cifar10.ARCHIVE_NAME).is_file()


def test_cifar10_archive_put_in_the_data_dir_by_hand_is_extracted_without_download(tmp_path):
    # A machine without the network: the archive copied in by hand is what --no-download uses
    # (the launcher's check lets it through, the loader extracts it), whatever its digest.
    from distbelief.config import DataConfig
    from distbelief.data.files import missing_data_files

    batches = _cifar_batches()
    _write_cifar(tmp_path / "src", batches)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / cifar10.ARCHIVE_NAME, "w:gz") as tar:
        tar.add(tmp_path / "src" / cifar10.BATCHES_DIR, arcname=cifar10.BATCHES_DIR)
    config = DataConfig(name="cifar10", data_dir=str(data_dir), download=False)
    assert missing_data_files(config) is None
    dataset = load_dataset("cifar10", split="test", data_dir=data_dir, download=False)
    _check_cifar(dataset, batches, "test")
    assert (data_dir / cifar10.BATCHES_DIR / "data_batch_5").is_file()


def test_another_archive_of_cifar10s_name_leaves_none_of_its_files(tmp_path):
    # Its members were put in the data folder before the batches were found missing.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / cifar10.ARCHIVE_NAME, "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    with pytest.raises(DatasetUnavailableError, match="did not contain them"):
        load_dataset("cifar10", split="train", data_dir=data_dir, download=False)
    assert [path.name for path in data_dir.iterdir()] == [cifar10.ARCHIVE_NAME]


def test_cifar10_missing_without_download_names_files_and_url(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", split="test", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / cifar10.BATCHES_DIR) in message
    for name in [*cifar10.SPLIT_FILES["train"], "test_batch"]:
        assert name in message
    assert cifar10.CIFAR10_URL in message


def test_cifar10_offline_download_raises_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "CIFAR10_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(DatasetUnavailableError, match=r"nowhere\.tar\.gz") as info:
        load_dataset("cifar10", split="train", data_dir=tmp_path, download=True)
    assert isinstance(info.value.__cause__, DatasetUnavailableError)


# ---- download helper -------------------------------------------------------------------------


def test_download_file_copies_verified_bytes(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 1000)
    dest = download_file(source.as_uri(), tmp_path / "out" / "file.bin", _md5(source))
    assert dest.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]


def test_download_file_checksum_mismatch_leaves_nothing(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    out_dir = tmp_path / "out"
    wrong_md5 = "0" * 32
    with pytest.raises(DatasetUnavailableError) as info:
        download_file(source.as_uri(), out_dir / "file.bin", wrong_md5)
    message = str(info.value)
    assert source.as_uri() in message and wrong_md5 in message and _md5(source) in message
    assert not out_dir.exists()  # the folder it made, too


def test_download_into_a_file_is_unavailable_naming_the_folder(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.write_text("")  # a file where the folder should be
    with pytest.raises(DatasetUnavailableError, match=f"data folder {data_dir}: exists and is not"):
        load_dataset("cifar10", split="train", data_dir=data_dir, download=True)
    assert data_dir.read_text() == ""


@pytest.mark.parametrize("member_name", ["../escape.txt", "/abs/escape.txt", "a/../../b.txt"])
def test_extract_tar_rejects_escaping_members(tmp_path, member_name):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member_name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ValueError, match="unsafe member"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


_EXTRACT_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from distbelief.data.download import extract_tar
from distbelief.errors import DatasetUnavailableError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    extract_tar(sys.argv[1], sys.argv[2])
except DatasetUnavailableError as e:
    print(e)
"""


def test_an_extraction_that_fails_midway_leaves_no_half_written_file(tmp_path):
    """A write that fails inside a member (a full disk; here the process's file size limit)
    leaves no file at the member's name: the members appear whole, once all are extracted."""
    archive = tmp_path / "archive.tar"
    with tarfile.open(archive, "w") as tar:
        for name, size in (("batches/small", 1000), ("batches/large", 2_000_000)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    out = tmp_path / "out"
    command = [sys.executable, "-c", _EXTRACT_WITH_A_FILE_SIZE_LIMIT, str(archive), str(out)]
    done = subprocess.run(
        [*command, "1000000"], capture_output=True, text=True, timeout=120, env=CHILD_ENV
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"could not extract {archive}: ")
    assert list(out.iterdir()) == []  # no member, and nothing staged, is left


def test_an_archive_of_garbage_is_refused_in_one_line(tmp_path):
    """tarfile names every method it tried on a line of its own: the error stays one line."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DatasetUnavailableError) as refused:
        extract_tar(archive, tmp_path / "out")
    message = str(refused.value)
    assert message.startswith(f"could not extract {archive}: ") and "\n" not in message
    assert list((tmp_path / "out").iterdir()) == []


# ---- MNIST -----------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _mnist_arrays(num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_images, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, size=num_images, dtype=np.uint8)


def _write_idx(path: Path, array: np.ndarray, gzipped: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gzipped:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(_idx_bytes(array)))
    else:
        path.write_bytes(_idx_bytes(array))
    return path


def _write_mnist_split(root: Path, split: str, gzipped: bool, num_images: int = 5) -> tuple:
    images, labels = _mnist_arrays(num_images, seed=len(split))
    images_name, labels_name = mnist.SPLIT_FILES[split]
    _write_idx(root / mnist.SUBDIR / images_name, images, gzipped)
    _write_idx(root / mnist.SUBDIR / labels_name, labels, gzipped)
    return images, labels


def _check_mnist(dataset: ArrayDataset, images: np.ndarray, labels: np.ndarray) -> None:
    assert dataset.images.shape == (len(images), 1, 28, 28)
    assert dataset.images.dtype == torch.float32 and dataset.labels.dtype == torch.int64
    pixels = _unnormalize(dataset.images, mnist.MNIST_MEAN, mnist.MNIST_STD) * 255
    expected = torch.from_numpy(images).float().unsqueeze(1)
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)
    assert dataset.labels.tolist() == labels.tolist()


def test_mnist_loads_raw_and_gzipped_idx(tmp_path):
    train = _write_mnist_split(tmp_path, "train", gzipped=False)
    test = _write_mnist_split(tmp_path, "test", gzipped=True, num_images=4)
    _check_mnist(load_dataset("mnist", split="train", data_dir=tmp_path, download=False), *train)
    _check_mnist(load_dataset("mnist", split="test", data_dir=tmp_path, download=False), *test)


def test_mnist_download_fetches_gz_files(tmp_path, monkeypatch):
    server = tmp_path / "server"
    images, labels = _write_mnist_split(server, "test", gzipped=True)
    served = server / mnist.SUBDIR
    md5s = {p.name: _md5(p) for p in served.iterdir()}
    monkeypatch.setattr(mnist, "MNIST_URL_BASE", served.as_uri() + "/")
    monkeypatch.setattr(mnist, "MNIST_MD5S", md5s)
    data_dir = tmp_path / "data"
    _check_mnist(load_dataset("mnist", split="test", data_dir=data_dir), images, labels)
    assert sorted(p.name for p in (data_dir / mnist.SUBDIR).iterdir()) == sorted(md5s)


def test_mnist_missing_without_download_names_files(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", split="train", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / mnist.SUBDIR) in message
    for pair in mnist.SPLIT_FILES.values():
        assert all(name in message for name in pair)
    assert mnist.MNIST_URL_BASE in message


@pytest.mark.parametrize("gzipped", [False, True])
def test_mnist_truncated_idx_names_file(tmp_path, gzipped):
    _write_mnist_split(tmp_path, "train", gzipped=gzipped)
    path = tmp_path / mnist.SUBDIR / "train-images-idx3-ubyte"
    payload = _idx_bytes(_mnist_arrays(5, seed=0)[0])[:-10]
    if gzipped:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="truncated") as info:
        load_dataset("mnist", split="train", data_dir=tmp_path, download=False)
    assert str(path) in str(info.value)


def test_mnist_bad_magic_names_file(tmp_path):
    _write_mnist_split(tmp_path, "test", gzipped=False)
    labels_path = tmp_path / mnist.SUBDIR / "t10k-labels-idx1-ubyte"
    # A labels file where an images file belongs: magic 0x801 instead of 0x803.
    (tmp_path / mnist.SUBDIR / "t10k-images-idx3-ubyte").write_bytes(labels_path.read_bytes())
    with pytest.raises(ValueError, match="magic 0x00000801") as info:
        load_dataset("mnist", split="test", data_dir=tmp_path, download=False)
    assert "t10k-images-idx3-ubyte" in str(info.value)


@pytest.mark.parametrize(
    ("images", "labels", "bad_file", "problem"),
    [
        (np.zeros((5, 10, 10)), np.zeros(5), "images", "expected 28x28 images, got 10x10"),
        (np.zeros((0, 28, 28)), np.zeros(0), "images", "holds no images (the MNIST test split"),
        (np.zeros((5, 28, 28)), np.zeros(3), "images", "holds 5 images but"),
        (np.zeros((2, 28, 28)), np.array([3, 200]), "labels", "labels outside [0, 10)"),
    ],
    ids=["image-size", "no-images", "counts", "label-range"],
)
def test_mnist_files_of_another_shape_or_count_are_named(
    tmp_path, images, labels, bad_file, problem
):
    images_name, labels_name = mnist.SPLIT_FILES["test"]
    images_path = _write_idx(tmp_path / mnist.SUBDIR / images_name, images, gzipped=False)
    labels_path = _write_idx(tmp_path / mnist.SUBDIR / labels_name, labels, gzipped=False)
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", split="test", data_dir=tmp_path, download=False)
    path = images_path if bad_file == "images" else labels_path
    assert str(info.value).startswith(str(path)) and problem in str(info.value)


# ---- digits and synthetic --------------------------------------------------------------------


def test_digits_split_is_fixed_and_complete():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    assert train.input_shape == (1, 32, 32) and train.num_classes == 10
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    again = load_dataset("digits", split="test")
    assert torch.equal(test.images, again.images) and torch.equal(test.labels, again.labels)
    assert set(train.labels.tolist()) == set(range(10))
    # Normalised with train statistics: the train split is ~zero-mean, unit-std.
    assert abs(train.images.mean().item()) < 1e-4
    assert abs(train.images.std().item() - 1.0) < 1e-3


def test_digits_train_and_test_partition_the_data():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    bunch = load_digits()
    # A partition keeps every distinct image and every label; overlap or loss would not.
    num_distinct_raw = len(torch.from_numpy(bunch.images).flatten(1).unique(dim=0))
    both = torch.cat([train.images, test.images]).flatten(1)
    assert len(both.unique(dim=0)) == num_distinct_raw
    labels = torch.cat([train.labels, test.labels])
    assert torch.equal(labels.bincount(), torch.from_numpy(bunch.target).bincount())


def test_synthetic_is_deterministic_and_learnable():
    train = load_dataset("synthetic", split="train")
    test = load_dataset("synthetic", split="test", num_samples=256)
    assert len(train) == 4096 and len(test) == 256
    assert train.input_shape == (3, 32, 32) and train.num_classes == 10
    assert torch.equal(test.images, load_dataset("synthetic", split="test", num_samples=256).images)
    assert not torch.equal(train.images[:256], test.images)
    # A nearest-class-mean rule fitted on train must classify test well above chance.
    means = torch.stack([train.images[train.labels == c].mean(0) for c in range(10)]).flatten(1)
    predicted = torch.cdist(test.images.flatten(1), means).argmin(1)
    assert (predicted == test.labels).float().mean().item() > 0.9


def test_load_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"imagenet.*digits.*cifar10.*mnist.*synthetic"):
        load_dataset("imagenet", split="train")
    with pytest.raises(ValueError, match=r"valid.*train.*test"):
        load_dataset("digits", split="valid")
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("digits", split="train", num_samples=10)
    assert ("digits", "cifar10", "mnist", "synthetic", *CLICK_LOG_DATASETS) == DATASET_NAMES


# ---- worker slicing and batching -------------------------------------------------------------


@pytest.mark.parametrize(("num_samples", "num_workers"), [(10, 3), (1797, 4), (2, 5), (0, 2)])
def test_worker_indices_partition_the_data(num_samples, num_workers):
    slices = [worker_indices(num_samples, rank, num_workers, seed=3) for rank in range(num_workers)]
    everything = torch.cat(slices)
    assert sorted(everything.tolist()) == list(range(num_samples))
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(slices[0], worker_indices(num_samples, 0, num_workers, seed=3))


@pytest.mark.parametrize(("rank", "num_workers"), [(-1, 2), (2, 2), (0, 0)])
def test_worker_indices_rejects_bad_rank(rank, num_workers):
    with pytest.raises(ValueError, match=r"rank|num_workers"):
        worker_indices(10, rank, num_workers)


def _tiny_dataset(num_samples: int = 10) -> ArrayDataset:
    images = torch.arange(num_samples, dtype=torch.float32).view(-1, 1, 1, 1)
    return ArrayDataset(images, torch.arange(num_samples), num_classes=num_samples, name="tiny")


def _visit_order(dataset, indices, batch_size, **kwargs) -> list[int]:
    return [
        label
        for _, labels in iterate_batches(dataset, indices, batch_size, **kwargs)
        for label in labels.tolist()
    ]


def test_iterate_batches_is_seeded_by_seed_and_epoch():
    dataset = _tiny_dataset(50)
    indices = torch.arange(50)
    first = _visit_order(dataset, indices, 8, seed=1, epoch=0)
    assert first == _visit_order(dataset, indices, 8, seed=1, epoch=0)
    assert first != _visit_order(dataset, indices, 8, seed=1, epoch=1)
    assert first != _visit_order(dataset, indices, 8, seed=2, epoch=0)
    assert len(first) == 48  # drop_last drops the final 2


def test_iterate_batches_visits_each_index_once():
    dataset = _tiny_dataset(10)
    indices = torch.tensor([7, 2, 9, 4, 0])
    batches = list(iterate_batches(dataset, indices, 2, seed=0, epoch=3, drop_last=False))
    assert [len(labels) for _, labels in batches] == [2, 2, 1]
    visited = [label for _, labels in batches for label in labels.tolist()]
    assert sorted(visited) == sorted(indices.tolist())
    for images, labels in batches:
        assert torch.equal(images.flatten(), labels.float())


def test_iterate_batches_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(_tiny_dataset(), torch.arange(10), 0, seed=0, epoch=0)


def test_digits_are_read_as_scikit_learn_loads_them():
    # The loader reads scikit-learn's bundled file itself (importing scikit-learn costs seconds).
    from distbelief.data.digits import _bundled_digits

    pixels, targets = _bundled_digits()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.images) and np.array_equal(targets, bunch.target)


def test_missing_data_files_names_what_a_job_lacks_and_nothing_when_complete(tmp_path):
    from distbelief.config import DataConfig
    from distbelief.data.files import (
        CIFAR10_BATCHES_DIR,
        CIFAR10_SPLIT_FILES,
        MNIST_SPLIT_FILES,
        MNIST_SUBDIR,
        missing_data_files,
    )

    def data(name, download=False):
        return DataConfig(name=name, data_dir=str(tmp_path), download=download)

    assert "test_batch" in missing_data_files(data("cifar10"))
    assert missing_data_files(data("cifar10", download=True)) is None  # it fetches them
    batches = tmp_path / CIFAR10_BATCHES_DIR
    batches.mkdir()
    for name in [*CIFAR10_SPLIT_FILES["train"], *CIFAR10_SPLIT_FILES["test"]][:-1]:
        (batches / name).write_bytes(b"")
    assert missing_data_files(data("cifar10")).split(" lacks ")[1].startswith("test_batch:")
    (batches / "test_batch").write_bytes(b"")
    assert missing_data_files(data("cifar10")) is None

    (tmp_path / MNIST_SUBDIR).mkdir()
    images, labels = MNIST_SPLIT_FILES["train"]
    (tmp_path / MNIST_SUBDIR / f"{images}.gz").write_bytes(b"")  # raw or gzipped
    (tmp_path / MNIST_SUBDIR / labels).write_bytes(b"")
    assert missing_data_files(data("mnist")).split(" lacks ")[1].startswith("t10k-images")
    for name in MNIST_SPLIT_FILES["test"]:
        (tmp_path / MNIST_SUBDIR / name).write_bytes(b"")
    assert missing_data_files(data("mnist")) is None
    assert (
        missing_data_files(data("digits")) is None and missing_data_files(data("synthetic")) is None
    )


@pytest.mark.parametrize(
    ("dataset", "blocked"),
    [
        ("cifar10", "cifar-10-batches-py/data_batch_2"),
        ("mnist", "mnist/t10k-labels-idx1-ubyte"),
        ("criteo", "criteo/train.txt"),
        ("movielens", "movielens/ratings.dat"),
    ],
)
def test_a_folder_where_a_data_file_should_be_is_named_as_such(tmp_path, dataset, blocked):
    """Not "lacks data_batch_2" (or "holds no ... file: expected one of train.txt") while the
    name is right there: a folder of that name."""
    from distbelief.config import DataConfig
    from distbelief.data.files import missing_data_files

    (tmp_path / blocked).mkdir(parents=True)
    config = DataConfig(name=dataset, data_dir=str(tmp_path), download=False)
    assert missing_data_files(config) == f"{tmp_path / blocked} is a folder, not a file"


@pytest.mark.parametrize("name", sorted(FIXED_TRAIN_EXAMPLES))
def test_the_fixed_training_set_sizes_are_the_loaders(name):
    # The launcher checks batches against these without loading the data.
    assert len(load_dataset(name, split="train")) == FIXED_TRAIN_EXAMPLES[name]


def test_a_failed_download_leaves_no_folder_it_made(tmp_path):
    missing_url = (tmp_path / "nowhere.tar.gz").as_uri()
    with pytest.raises(DatasetUnavailableError):
        download_file(missing_url, tmp_path / "data" / "cifar" / "x.tar.gz", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"name": "synthetic", "num_samples": 2.5}, "num_samples must be an integer >= 1, got 2.5"),
        (
            {"name": "synthetic", "num_samples": True},
            "num_samples must be an integer >= 1, got True",
        ),
        ({"name": "synthetic-ctr", "table_size": 2.5}, "table_size must be an integer, got 2.5"),
        ({"name": "synthetic-ctr", "table_size": True}, "table_size must be an integer, got True"),
        (
            {"name": "digits", "table_size": 10},
            "table_size=10 applies only to 'synthetic-ctr' and 'criteo', not 'digits'",
        ),
        (
            {"name": "movielens", "table_size": 10},
            "table_size=10 applies only to 'synthetic-ctr' and 'criteo', not 'movielens'",
        ),
    ],
)
def test_load_dataset_refuses_a_size_of_another_type_or_for_another_data_set(arguments, problem):
    """Not a TypeError from deep in the generator, a bool taken for 1, nor a table size
    ignored (movielens's tables stay as large as its ids)."""
    with pytest.raises(ValueError) as caught:
        load_dataset(split="test", data_dir="no-such-folder", **arguments)
    assert str(caught.value) == problem
