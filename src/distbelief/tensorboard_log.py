"""TensorBoard scalars of a run, written from metrics records to ``<run_dir>/tensorboard/``.

Owns the tag names only: which record field becomes which scalar, keyed by which counter. It
knows nothing about processes or the terminal; ``tensorboard --logdir runs/`` shows every run.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter

from distbelief.metrics import ROLES

TENSORBOARD_DIR = "tensorboard"
"""The folder, inside a run folder, that holds the event files."""

FLUSH_EVERY_S = 2
"""Event files reach the disk at least this often, so a live TensorBoard keeps up."""

_SCALARS = {
    "worker": ("step", ("loss", "accuracy", "staleness")),
    "evaluator": ("version", ("test_loss", "test_accuracy")),
    "shard": ("version", ("pushes_per_s", "bytes_per_s", "staleness")),
}
"""Per role: the field used as TensorBoard's step, and the fields written as scalars."""


def scalar_tags(record: dict) -> list[tuple[str, float, int]]:
    """The ``(tag, value, step)`` scalars of one metrics record.

    Tags are ``worker/<rank>/<field>`` (keyed by the worker's step), ``ps/test_loss`` and
    ``ps/test_accuracy`` (keyed by the shards' version) and ``shard/<id>/<field>`` (keyed by
    that shard's version). Fields with no value, and records with no step or version, give none.

    Raises:
        ValueError: the record's role is not one of ``distbelief.metrics.ROLES``.
    """
    role = record.get("role")
    if role not in ROLES:
        raise ValueError(f"tensorboard record has unknown role {role!r}; expected {ROLES}")
    step_field, fields = _SCALARS[role]
    step = record.get(step_field)
    if step is None:
        return []
    prefix = "ps" if role == "evaluator" else f"{role}/{record['rank']}"
    return [
        (f"{prefix}/{name}", float(record[name]), int(step))
        for name in fields
        if record.get(name) is not None
    ]


class TensorBoardLog:
    """Writes metrics records as TensorBoard scalars; use as a context manager.

    Scalars carry the time they are written as their wall time: records are routed as they
    arrive, so TensorBoard's "relative" axis shows run time.

    Args:
        run_dir: the run folder; event files go to ``<run_dir>/tensorboard/``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=FLUSH_EVERY_S)

    def write(self, record: dict) -> None:
        """Adds the scalars of one metrics record (see ``scalar_tags``).

        Raises:
            ValueError: the record's role is unknown.
        """
        for tag, value, step in scalar_tags(record):
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        """Flushes and closes the event file; closing twice is harmless."""
        self._writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
