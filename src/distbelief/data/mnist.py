"""MNIST from IDX files (raw or gzipped) in `<data_dir>/mnist/`, with optional download.

Owns the IDX parser and file lookup; normalises with the published MNIST train-split mean and
std, so loading the test split never needs the train files.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from distbelief.data.base import ArrayDataset, normalize_channels
from distbelief.data.download import download_file
from distbelief.data.files import MNIST_SPLIT_FILES as SPLIT_FILES
from distbelief.data.files import MNIST_SUBDIR as SUBDIR
from distbelief.data.files import MNIST_URL_BASE, not_a_file
from distbelief.errors import DatasetUnavailableError

MNIST_MD5S = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
NUM_CLASSES = 10
IMAGE_SIZE = (28, 28)
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim
# Mean and std of the 60000 train images scaled to [0, 1].
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def load_mnist(split: str, data_dir: Path, download: bool = True) -> ArrayDataset:
    """Loads one split of MNIST from `<data_dir>/mnist/`.

    Each file is looked up raw first, then with a .gz suffix.

    Args:
        split: "train" or "test" (the t10k files).
        data_dir: Folder that holds (or will hold) mnist/.
        download: Fetch missing files (gzipped, md5-checked) into `<data_dir>/mnist/`.

    Returns:
        The split as an ArrayDataset named "mnist", images of shape (N, 1, 28, 28).

    Raises:
        ValueError: If split is unknown, a file is a folder or not valid IDX (bad magic,
            truncated, corrupt gzip), the images are not 28x28 or there are none, the image
            and label counts differ or a label is not in [0, 10); the message names the file.
        DatasetUnavailableError: If files are missing and download is False or fails; the
            message names the folder, the expected files and the URL for a manual download.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
    mnist_dir = Path(data_dir) / SUBDIR
    images_path, labels_path = (_locate(mnist_dir, name, download) for name in SPLIT_FILES[split])
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != IMAGE_SIZE:
        height, width = images.shape[1:]
        raise ValueError(f"{images_path}: expected 28x28 images, got {height}x{width}")
    if len(images) == 0:
        raise ValueError(f"{images_path}: holds no images (the MNIST {split} split is empty)")
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: labels outside [0, {NUM_CLASSES})")
    pixels = torch.from_numpy(images).to(torch.float32).unsqueeze(1) / 255.0
    return ArrayDataset(
        images=normalize_channels(pixels, MNIST_MEAN, MNIST_STD),
        labels=torch.from_numpy(labels).to(torch.int64),
        num_classes=NUM_CLASSES,
        name="mnist",
    )


def _locate(mnist_dir: Path, name: str, download: bool) -> Path:
    """Path of `name` or `name.gz` in mnist_dir, downloading the .gz if allowed and needed."""
    candidates = (mnist_dir / name, mnist_dir / f"{name}.gz")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    blocked = not_a_file(candidates)
    if blocked:
        raise ValueError(blocked)
    if not download:
        raise DatasetUnavailableError(_unavailable_message(mnist_dir, name, "download=False"))
    gz_name = f"{name}.gz"
    try:
        return download_file(MNIST_URL_BASE + gz_name, mnist_dir / gz_name, MNIST_MD5S[gz_name])
    except DatasetUnavailableError as e:
        raise DatasetUnavailableError(_unavailable_message(mnist_dir, name, str(e))) from e


def _unavailable_message(mnist_dir: Path, name: str, reason: str) -> str:
    expected = [n for pair in SPLIT_FILES.values() for n in pair]
    return (
        f"MNIST file {name} (or {name}.gz) not found in {mnist_dir} ({reason}). Expected files "
        f"in {mnist_dir}, raw or .gz: {', '.join(expected)}. Download them from "
        f"{MNIST_URL_BASE}<name>.gz"
        + (", or pass download=True." if reason == "download=False" else ".")
    )


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parses an unsigned-byte IDX file (raw or gzipped) into a uint8 array.

    Layout: a big-endian uint32 magic (0x0000 08 <num_dims>), num_dims big-endian uint32
    sizes, then the bytes of the array in C order.

    Args:
        path: The file; a .gz suffix means gzip-compressed.
        expected_magic: IDX_IMAGES_MAGIC or IDX_LABELS_MAGIC.

    Returns:
        A uint8 array whose shape is the dims from the header.

    Raises:
        ValueError: If the file is not valid gzip, has a different magic, or is shorter or
            longer than its header says; the message names the file.
    """
    payload = _read_bytes(path)
    num_dims = expected_magic & 0xFF
    header_bytes = 4 + 4 * num_dims
    # The magic is checked before the header length so a wrong file type reports as such.
    if len(payload) >= 4:
        (magic,) = struct.unpack(">I", payload[:4])
        if magic != expected_magic:
            raise ValueError(
                f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x}"
            )
    if len(payload) < header_bytes:
        raise ValueError(
            f"{path}: truncated IDX file: {len(payload)} bytes, header needs {header_bytes}"
        )
    dims = struct.unpack(f">{num_dims}I", payload[4:header_bytes])
    num_data_bytes = len(payload) - header_bytes
    if num_data_bytes != math.prod(dims):
        kind = "truncated" if num_data_bytes < math.prod(dims) else "oversized"
        raise ValueError(
            f"{path}: {kind} IDX file: header says dims {dims} ({math.prod(dims)} bytes) but "
            f"{num_data_bytes} data bytes follow"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a valid gzip file: {e}") from e
