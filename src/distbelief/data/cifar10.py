"""CIFAR-10 in the official python (pickle) format, with optional download.

Owns locating, fetching and decoding `cifar-10-batches-py/`; normalises with the published
CIFAR-10 train-split channel statistics, so loading the test split never needs the train files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distbelief.data.base import ArrayDataset, normalize_channels
from distbelief.data.download import download_file, extract_tar
from distbelief.data.files import CIFAR10_ARCHIVE_NAME as ARCHIVE_NAME
from distbelief.data.files import CIFAR10_BATCHES_DIR as BATCHES_DIR
from distbelief.data.files import CIFAR10_SPLIT_FILES as SPLIT_FILES
from distbelief.data.files import CIFAR10_URL, not_a_file
from distbelief.data.plain_pickle import load_plain_pickle
from distbelief.errors import DatasetUnavailableError

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
# Per-channel mean and std of the 50000 train images scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(split: str, data_dir: Path, download: bool = True) -> ArrayDataset:
    """Loads one split of CIFAR-10 from `<data_dir>/cifar-10-batches-py/`.

    Args:
        split: "train" (data_batch_1..5) or "test" (test_batch).
        data_dir: Folder that holds (or will hold) cifar-10-batches-py/.
        download: Fetch and extract the official archive into data_dir if files are missing.
            Either way, an archive already in data_dir (cifar-10-python.tar.gz) is extracted
            when files are missing (with download, only the official one: another is fetched
            again).

    Returns:
        The split as an ArrayDataset named "cifar10", images of shape (N, 3, 32, 32).

    Raises:
        ValueError: If split is unknown, a batch file is not a valid CIFAR-10 batch (the
            message names it and what is wrong) or is a folder, or the split holds no images.
        DatasetUnavailableError: If files are missing and download is False or fails; the
            message names the folder, the expected files and the URL for a manual download.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
    data_dir = Path(data_dir)
    batches_dir = data_dir / BATCHES_DIR
    blocked = not_a_file(batches_dir / name for name in SPLIT_FILES[split])
    if blocked:
        raise ValueError(blocked)
    if _missing_files(batches_dir, split):
        archive = data_dir / ARCHIVE_NAME
        # An archive put there by hand (a machine without the network) is the user's to
        # choose: extracted as it is; a download keeps only the official one.
        if not download and not archive.is_file():
            raise DatasetUnavailableError(_unavailable_message(data_dir, split, "download=False"))
        try:
            if download:
                download_file(CIFAR10_URL, archive, CIFAR10_MD5)
            # Another archive of that name leaves none of its files in data_dir.
            extract_tar(archive, data_dir, [f"{BATCHES_DIR}/{n}" for n in SPLIT_FILES[split]])
        except DatasetUnavailableError as e:
            raise DatasetUnavailableError(_unavailable_message(data_dir, split, str(e))) from e
        if _missing_files(batches_dir, split):
            reason = f"{ARCHIVE_NAME} did not contain them"
            raise DatasetUnavailableError(_unavailable_message(data_dir, split, reason))
    images, labels = zip(*(_read_batch(batches_dir / n) for n in SPLIT_FILES[split]), strict=True)
    if sum(len(batch) for batch in labels) == 0:
        names = ", ".join(SPLIT_FILES[split])
        raise ValueError(f"{batches_dir}: the CIFAR-10 {split} split ({names}) holds no images")
    pixels = torch.from_numpy(np.concatenate(images)).to(torch.float32) / 255.0
    return ArrayDataset(
        images=normalize_channels(pixels, CIFAR10_MEAN, CIFAR10_STD),
        labels=torch.from_numpy(np.concatenate(labels)),
        num_classes=NUM_CLASSES,
        name="cifar10",
    )


def _missing_files(batches_dir: Path, split: str) -> list[str]:
    return [name for name in SPLIT_FILES[split] if not (batches_dir / name).is_file()]


def _unavailable_message(data_dir: Path, split: str, reason: str) -> str:
    batches_dir = data_dir / BATCHES_DIR
    expected = [*SPLIT_FILES["train"], *SPLIT_FILES["test"]]
    return (
        f"CIFAR-10 {split} split unavailable: {batches_dir} lacks "
        f"{', '.join(_missing_files(batches_dir, split))} ({reason}). Expected files in "
        f"{batches_dir}: {', '.join(expected)}. Download {CIFAR10_URL} (md5 {CIFAR10_MD5}) "
        f"and extract it into {data_dir}"
        + (", or pass download=True." if reason == "download=False" else ".")
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decodes one pickled batch into uint8 (N, 3, 32, 32) images and int64 (N,) labels.

    A batch is a Python 2 pickle of a dict: b"data" a uint8 numpy array of shape (N, 3072) and
    b"labels" a list of N ints in [0, 10). It is unpickled as plain data only, so a crafted
    file cannot run code while it is read.

    Raises:
        ValueError: The file is not such a batch; the message names it and what is wrong.
    """
    with open(path, "rb") as f:
        try:
            batch = load_plain_pickle(f, encoding="bytes")
        except Exception as e:  # a corrupt pickle fails in many ways: each means "not a batch"
            reason = str(e) or type(e).__name__
            raise ValueError(f"{path}: not a valid CIFAR-10 batch file: {reason}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict (a CIFAR-10 batch), got {_describe(batch)}")
    missing = [repr(key) for key in (b"data", b"labels") if key not in batch]
    if missing:
        raise ValueError(f"{path}: the batch dict lacks {' and '.join(missing)}")
    data = batch[b"data"]
    num_pixels = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: b'data' must be a 2-D uint8 array, got {_describe(data)}")
    labels = _read_labels(path, batch[b"labels"])
    if data.shape[1] != num_pixels or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected data of shape (N, {num_pixels}) and N labels, got data "
            f"{data.shape} and {len(labels)} labels"
        )
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _read_labels(path: Path, labels: object) -> np.ndarray:
    """A batch's b"labels" as int64, refused unless a list (or 1-D array) of ints in range."""
    expected = f"a list of integers in [0, {NUM_CLASSES})"
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: b'labels' must be {expected}, got {_describe(labels)}")
    try:
        array = np.asarray(labels)
    except ValueError as e:  # ragged nesting
        raise ValueError(f"{path}: b'labels' must be {expected}: {e}") from e
    if array.shape == (0,):
        return np.zeros(0, dtype=np.int64)  # [] reads as float64
    # An int too large for int64 makes an object array: refused with the other non-integers.
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: b'labels' must be {expected}, got {_describe(array)}")
    outside = array[(array < 0) | (array >= NUM_CLASSES)]
    if len(outside):
        raise ValueError(
            f"{path}: b'labels' must be {expected}, got {len(outside)} outside it (e.g. "
            f"{outside[0]})"
        )
    return array.astype(np.int64)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"type {type(value).__name__}"
