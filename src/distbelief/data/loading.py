"""Loading a data set by name: the name -> loader dispatch behind ``load_dataset``, and the
check of a job's files before its processes load them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distbelief.config import (
    CLICK_LOG_DATASETS,
    DATASET_NAMES,
    TABLE_SIZE_DATASETS,
    DataConfig,
    check_count,
)
from distbelief.data.base import ArrayDataset
from distbelief.data.cifar10 import load_cifar10
from distbelief.data.criteo import check_criteo_split, load_criteo
from distbelief.data.ctr import CtrDataset
from distbelief.data.digits import load_digits
from distbelief.data.files import DEFAULT_DATA_DIR, os_error_message
from distbelief.data.mnist import load_mnist
from distbelief.data.movielens import check_movielens_splits, load_movielens
from distbelief.data.synthetic import make_synthetic
from distbelief.data.synthetic_ctr import make_synthetic_ctr
from distbelief.errors import DatasetUnavailableError

SPLITS = ("train", "test")

logger = logging.getLogger(__name__)


def load_dataset(
    name: str,
    *,
    split: str,
    data_dir: str | Path | None = None,
    download: bool = True,
    num_samples: int | None = None,
    table_size: int | None = None,
) -> ArrayDataset | CtrDataset:
    """Loads one split of a data set into memory.

    Args:
        name: One of ``distbelief.config.DATASET_NAMES``.
        split: "train" or "test".
        data_dir: Folder for files of cifar10 and mnist; defaults to ./data. Ignored by digits
            (bundled with scikit-learn) and synthetic (generated).
        download: Let cifar10 and mnist fetch missing files.
        num_samples: Size of a synthetic split (default 4096 train / 1024 test); only valid
            for "synthetic".
        table_size: Ids per table of "synthetic-ctr", or the rows "criteo"'s ids are folded
            into (see ``DataConfig.table_size``); only valid for those two.

    Returns:
        The split: images normalised per channel with train-split statistics, or a click log
        (``CtrDataset``) for the names in ``CLICK_LOG_DATASETS``.

    Raises:
        ValueError: If name or split is unknown, num_samples or table_size is not an
            integer or is given for a data set it does not apply to, or a data file is
            corrupt, cannot be read (permissions, say) or the split empty (the message names
            the file, and the line of a text file).
        DatasetUnavailableError: If the files of cifar10 or mnist are missing and cannot be
            downloaded.
    """
    _check_args(name, split, num_samples, table_size)
    with _os_errors_named():
        return _load(name, split, data_dir, download, num_samples, table_size)


@contextmanager
def _os_errors_named() -> Iterator[None]:
    """An OSError on a data file as the ValueError of a bad file: one line naming it (a
    missing file that cannot be downloaded stays a DatasetUnavailableError)."""
    try:
        yield
    except DatasetUnavailableError:
        raise
    except OSError as e:
        raise ValueError(os_error_message(e)) from e


def _load(
    name: str,
    split: str,
    data_dir: str | Path | None,
    download: bool,
    num_samples: int | None,
    table_size: int | None,
) -> ArrayDataset | CtrDataset:
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if name in CLICK_LOG_DATASETS:
        return _load_click_log(name, split, root, table_size)
    if name == "digits":
        dataset = load_digits(split)
    elif name == "cifar10":
        dataset = load_cifar10(split, root, download=download)
    elif name == "mnist":
        dataset = load_mnist(split, root, download=download)
    else:
        dataset = make_synthetic(split, num_samples)
    logger.debug(  # -v: a refusal found after loading stays one line
        "loaded %s/%s: %d samples of shape %s", name, split, len(dataset), dataset.input_shape
    )
    return dataset


def _load_click_log(name: str, split: str, root: Path, table_size: int | None) -> CtrDataset:
    if name == "synthetic-ctr":
        dataset = make_synthetic_ctr(split, **({"table_size": table_size} if table_size else {}))
    elif name == "criteo":
        dataset = load_criteo(split, root, num_embeddings=table_size)
    else:
        dataset = load_movielens(split, root)
    logger.debug(
        "loaded %s/%s: %d clicks of %d samples, %d tables",
        name,
        split,
        int(dataset.labels.sum()),
        len(dataset),
        dataset.num_tables,
    )
    return dataset


def table_size_source(config: DataConfig) -> str:
    """Where a click log's table sizes come from, said as what to give alike: a process that
    builds the job's tables with another size than the shards hold is told this."""
    if config.name == "movielens":
        return (
            "movielens sizes its tables by the largest user and movie ids of the ratings in "
            f"--data-dir (this process read {config.data_dir}): give the job's --data-dir"
        )
    if config.name == "criteo" and config.table_size is None:
        return "criteo without --table-size keeps every raw id: give the job's --table-size"
    return "give the job's --table-size"


def load_job_dataset(
    config: DataConfig, split: str, *, download: bool | None = None
) -> ArrayDataset | CtrDataset:
    """``load_dataset`` of a job's data section (``download``: override its setting)."""
    return load_dataset(
        config.name,
        split=split,
        data_dir=config.data_dir,
        download=config.download if download is None else download,
        table_size=config.table_size,
    )


def check_job_data(
    config: DataConfig,
    splits: tuple[str, ...] = SPLITS,
    *,
    embedding_dim: int | None = None,
    dense_tables: tuple[str, ...] = (),
) -> int | None:
    """Reads what a job's processes will read of its data set's files, so that a corrupt file
    or an empty split is refused before any of them starts. CIFAR-10's and MNIST's splits are
    loaded (their size is fixed: seconds); a click log's lines are checked one by one without
    being kept (a fraction of what loading costs, which a malformed line far into the file
    would otherwise only stop in a process already started). Generated and bundled data sets
    have nothing to check. ``embedding_dim``: the width of the model's tables, which MovieLens
    sizes by its largest ids (an id too large for one is refused by line; for one of
    ``dense_tables``, those the job leaves dense, too large for this machine's memory too).

    Returns:
        The training split's number of examples, when ``splits`` has it and the data set is
        read from files; else None.

    Raises:
        ValueError: A file is corrupt or cannot be read, or a split would be empty; the
            message names the file (and a text file's line).
        DatasetUnavailableError: Files are missing and cannot be downloaded.
    """
    with _os_errors_named():
        return _check_job_data(config, splits, embedding_dim, dense_tables)


def _check_job_data(
    config: DataConfig,
    splits: tuple[str, ...],
    embedding_dim: int | None,
    dense_tables: tuple[str, ...],
) -> int | None:
    root = Path(config.data_dir) if config.data_dir else DEFAULT_DATA_DIR
    counts: dict[str, int] = {}
    if config.name == "movielens":
        # Every split reads the one file: checked once.
        counts["train"] = check_movielens_splits(
            splits, root, embedding_dim=embedding_dim, dense_tables=dense_tables
        )
    for split in splits:
        if config.name in ("cifar10", "mnist"):
            counts[split] = len(load_job_dataset(config, split))
        elif config.name == "criteo":
            counts[split] = check_criteo_split(split, root)
    return counts.get("train") if "train" in splits else None


def _check_args(name: str, split: str, num_samples: int | None, table_size: int | None) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set name {name!r}; choose one of {DATASET_NAMES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    # Ignoring either silently would make a run look other than it is (smaller, larger, its
    # ids folded); a float or a bool would fail deep in the generator, or pass for 1.
    if num_samples is not None:
        check_count("num_samples", num_samples)
        if name != "synthetic":
            raise ValueError(f"num_samples={num_samples} applies only to 'synthetic', not {name!r}")
    if table_size is not None:
        if type(table_size) is not int:
            raise ValueError(f"table_size must be an integer, got {table_size!r}")
        if name not in TABLE_SIZE_DATASETS:
            names = " and ".join(map(repr, TABLE_SIZE_DATASETS))
            raise ValueError(f"table_size={table_size} applies only to {names}, not {name!r}")
