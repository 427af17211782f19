"""TensorBoard scalars of a run, written from metrics records to ``<run_dir>/tensorboard/``.

Owns the tag names only: which record field becomes which scalar, keyed by which counter. It
knows nothing about processes or the terminal; ``tensorboard --logdir runs/`` shows every run.
Events are written with TensorBoard's own event-file writer, not torch's: the launcher that
writes them never has to import torch.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from distbelief.telemetry.metrics import ROLES, SHARD_FIGURES
from distbelief.telemetry.sink import ClosedOnExit

TENSORBOARD_DIR = "tensorboard"
"""The folder, inside a run folder, that holds the event files."""

FLUSH_EVERY_S = 2
"""Event files reach the disk at least this often, so a live TensorBoard keeps up."""

_SCALARS = {
    "worker": ("step", ("loss", "accuracy", "staleness", "portions", "auc")),
    "evaluator": ("version", ("test_loss", "test_accuracy", "test_auc")),
    "shard": ("version", SHARD_FIGURES),
    "coordinator": ("step", ("loss", "grad_norm", "step_size", "evaluations", "backups")),
}
"""Per role: the field used as TensorBoard's step, and the fields written as scalars."""


def scalar_tags(record: dict) -> list[tuple[str, float, int]]:
    """The ``(tag, value, step)`` scalars of one metrics record.

    Tags are ``worker/<rank>/<field>`` (keyed by the worker's step; a partitioned replica's
    stages each write their ``staleness`` as ``worker/<rank>/stage<s>/staleness``),
    ``ps/test_loss`` and ``ps/test_accuracy`` (keyed by the shards' version) and
    ``shard/<id>/<field>`` (keyed by that shard's version). Fields with no value, and
    records with no step or version, give none.

    Raises:
        ValueError: the record's role is not one of ``distbelief.telemetry.ROLES``.
    """
    role = record.get("role")
    if role not in ROLES:
        raise ValueError(f"tensorboard record has unknown role {role!r}; expected {ROLES}")
    step_field, fields = _SCALARS[role]
    step = record.get(step_field)
    if step is None:
        return []
    prefix = "ps" if role == "evaluator" else f"{role}/{record['rank']}"
    stage = record.get("stage") if role == "worker" else None
    return [
        (f"{_stage_prefix(prefix, stage, name)}/{name}", float(record[name]), int(step))
        for name in fields
        if record.get(name) is not None
    ]


_REPLICA_FIELDS = frozenset({"loss", "accuracy", "auc"})
"""A partitioned replica's fields that only its last stage writes: the replica's own."""


def _stage_prefix(prefix: str, stage: object, name: str) -> str:
    """Every stage of a partitioned replica writes its own ``staleness`` at the same steps:
    each gets a tag of its own (``worker/<rank>/stage<s>/``), not one line zigzagging
    between them."""
    if stage is None or name in _REPLICA_FIELDS:
        return prefix
    return f"{prefix}/stage{int(stage)}"


class TensorBoardLog(ClosedOnExit):
    """Writes metrics records as TensorBoard scalars; use as a context manager.

    Scalars carry the time they are written as their wall time: records are routed as they
    arrive, so TensorBoard's "relative" axis shows run time. The event file is opened with the
    first record (or at ``close``): importing TensorBoard takes seconds the launcher would
    otherwise spend before its processes start.

    Args:
        run_dir: the run folder; event files go to ``<run_dir>/tensorboard/``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer: Any = None
        self._closed = False
        self._broken = False

    def _event_writer(self) -> Any:
        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            _quiet_writer_thread_errors()
            self._writer = EventFileWriter(str(self.log_dir), flush_secs=FLUSH_EVERY_S)
        return self._writer

    def _failed(self, error: OSError) -> OSError:
        """``error`` (the folder made read-only, a full disk) naming the event file: a write
        of TensorBoard's own names none, or the byte string of its path."""
        self._broken = True
        name = getattr(self._writer, "_file_name", None) or self.log_dir
        filename = error.filename if isinstance(error.filename, str) else str(name)
        return OSError(error.errno, error.strerror or str(error), filename)

    def write(self, record: dict) -> None:
        """Adds the scalars of one metrics record (see ``scalar_tags``).

        Raises:
            ValueError: the record's role is unknown, or the log is closed.
            OSError: the event file could not be written (the folder made read-only, a full
                disk), naming it.
        """
        if self._closed:
            raise ValueError(f"tensorboard log in {self.log_dir} is closed")
        scalars = scalar_tags(record)
        if not scalars:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        try:
            writer, now = self._event_writer(), time.time()
            for tag, value, step in scalars:
                summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
                writer.add_event(Event(wall_time=now, step=step, summary=summary))
        except OSError as e:
            raise self._failed(e) from e

    def message(self, text: str, time_s: float | None = None) -> None:
        """Messages are for people: TensorBoard gets the scalars only."""

    def close(self) -> None:
        """Flushes and closes the event file; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                self._writer.close()
            else:  # nothing was written: an empty folder, and no TensorBoard import on the way out
                self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if not self._broken:  # else raised already, by the write that found it
                raise self._failed(e) from e


_quieted = False


def _quiet_writer_thread_errors() -> None:
    """TensorBoard writes its event file from a thread of its own, which prints the traceback
    of a failed write (the run folder made read-only, a full disk) before the next ``write``
    or ``close`` raises it again, to the launcher, which says it in one line: that thread's
    ``OSError`` is not printed. Every other thread's exception goes to the hook as before."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        writer_thread = type(args.thread).__name__ == "_AsyncWriterThread"
        if writer_thread and args.exc_type is not None and issubclass(args.exc_type, OSError):
            return
        previous(args)

    threading.excepthook = hook
