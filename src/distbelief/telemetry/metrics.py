"""The metrics record of a run and its CSV file (``metrics.csv`` in the run folder).

Owns the field names, the record shape, and writing/reading the CSV (``MetricsWriter`` is the
run's CSV ``Sink``). It knows nothing about training, plotting or the terminal.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
import os
from pathlib import Path

from distbelief.files import write_text_atomic
from distbelief.telemetry.sink import ClosedOnExit

logger = logging.getLogger(__name__)

METRIC_FIELDS = (
    "time_s",
    "role",
    "rank",
    "step",
    "loss",
    "accuracy",
    "test_loss",
    "test_accuracy",
    "version",
    "staleness",
    "pushes_per_s",
    "bytes_per_s",
    "bytes_pushed",
    "bytes_pulled",
    "latency_p50_ms",
    "latency_p99_ms",
    "grad_norm",
    "step_size",
    "evaluations",
    "portions",
    "backups",
    "backups_won",
    "stage",
    "compute_s",
    "idle_s",
    "activation_bytes",
    "auc",
    "test_auc",
    "rows",
    "rows_admitted",
    "rows_evicted",
    "rows_pulled",
    "rows_pushed",
    "rows_pending",
)
"""The CSV columns, in order. ``time_s`` is seconds since the run started (a resumed run's
rows count on from the last row before them, its stopped time left out); ``staleness`` is
the mean staleness of a worker's pushes (or of a shard's received pushes) since its previous
record; ``pushes_per_s`` and ``bytes_per_s`` (received plus sent, through its socket or shared
memory) are a shard's rates since its previous record; ``bytes_pushed``, ``bytes_pulled``
(tensor bytes, through the socket or shared memory) and the request latency percentiles
``latency_p50_ms`` / ``latency_p99_ms`` are a worker's wire figures since its previous record.
Sandblaster's coordinator writes one record per L-BFGS iteration (``step``: the iteration;
``loss``, ``grad_norm`` and ``step_size``; ``evaluations`` of the objective; ``portions``
committed; ``backups`` handed out and ``backups_won``), and one per worker with its committed
``portions`` of the iteration. A stage of a model-parallel replica writes worker records with
its ``stage``, its seconds of ``compute_s`` and of ``idle_s`` (waiting for its neighbours) and the
``activation_bytes`` it sent and received since its previous record (only the last stage has the
loss and accuracy). With embedding tables, a worker's records add the window's click ``auc`` and
the ``rows_pulled`` and ``rows_pushed`` since its previous record, the evaluator's add
``test_auc``, and a shard's add its live ``rows``, the rows ever ``rows_admitted`` and
``rows_evicted``, and the ids awaiting admission, ``rows_pending``, over its tables."""

_OLDER_HEADERS = (
    METRIC_FIELDS[:10],
    METRIC_FIELDS[:12],
    METRIC_FIELDS[:16],
    METRIC_FIELDS[:22],
    METRIC_FIELDS[:26],
    METRIC_FIELDS[:33],
)
"""Headers of earlier versions of ``metrics.csv``, still readable; their missing columns read
as ``None``."""

ROLES = ("worker", "evaluator", "shard", "coordinator")
"""Who wrote a record. ``rank`` is the worker rank or shard id; the evaluator and the
coordinator use rank 0."""

SHARD_FIGURES = (
    "pushes_per_s",
    "bytes_per_s",
    "staleness",
    "rows",
    "rows_admitted",
    "rows_evicted",
    "rows_pending",
)
"""What a shard's records report, by version: shown live and logged to TensorBoard."""

_INT_FIELDS = frozenset(
    {
        "rank",
        "step",
        "version",
        "bytes_pushed",
        "bytes_pulled",
        "evaluations",
        "portions",
        "backups",
        "backups_won",
        "stage",
        "activation_bytes",
        "rows",
        "rows_admitted",
        "rows_evicted",
        "rows_pulled",
        "rows_pushed",
        "rows_pending",
    }
)


def _check_role(role: object) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown metrics role {role!r}; expected one of {ROLES}")
    return str(role)


def _normalize(name: str, value: object) -> object:
    """Returns ``value`` as the type the CSV stores for field ``name`` (int, float or None)."""
    if name == "role":
        return _check_role(value)
    if value is None:
        return None
    # bool is an Integral, but True as a step or loss is always a caller bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"metrics field {name!r}: expected a number, got {value!r}")
    if name in _INT_FIELDS:
        if not isinstance(value, numbers.Integral):
            raise ValueError(f"metrics field {name!r}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


PARTITION_VERSIONS = "partition_versions"
"""An evaluation's versions of a model-parallel model's partitions, in stage order (not a
metrics.csv column: its ``version`` is their lowest)."""
EVALUATION_FIELDS = ("test_loss", "test_accuracy", "test_auc", "version", PARTITION_VERSIONS)
"""An evaluation as a run's summary keeps it (its ``final``)."""
EVALUATED = "evaluated"
"""The event that carries an evaluation whole, after its metrics.csv row (a ``metric``
event): what a job that ends before its evaluator returned keeps as its last one."""


def make_record(role: str, rank: int, *, time_s: float, **fields: object) -> dict[str, object]:
    """Builds one metrics record with every field of ``METRIC_FIELDS``.

    Args:
        role: ``"worker"``, ``"evaluator"`` or ``"shard"``.
        rank: worker rank or shard id; 0 for the evaluator.
        time_s: seconds since the run started.
        **fields: any other fields of ``METRIC_FIELDS`` (``step``, ``loss``, ``accuracy``,
            ``test_loss``, ``test_accuracy``, ``version``, ``staleness``, ``pushes_per_s``,
            ``bytes_per_s``). Fields not given are ``None``.

    Returns:
        A dict keyed by ``METRIC_FIELDS`` in order; ints for rank/step/version, floats for the
        rest, ``None`` for fields this role does not report.

    Raises:
        ValueError: unknown role, a field name not in ``METRIC_FIELDS``, a negative rank, or a
            value that is not a number.
    """
    _check_role(role)
    unknown = sorted(set(fields) - set(METRIC_FIELDS))
    if unknown:
        raise ValueError(f"unknown metrics field(s) {unknown}; expected names from {METRIC_FIELDS}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        raise ValueError(f"metrics field 'rank': expected an integer >= 0, got {rank!r}")
    if time_s is None:
        raise ValueError("metrics field 'time_s': expected a number, got None")
    given = {"role": role, "rank": rank, "time_s": time_s, **fields}
    return {name: _normalize(name, given.get(name)) for name in METRIC_FIELDS}


def _format_cell(value: object) -> str:
    if value is None:
        return ""
    # repr() of a float round-trips exactly through float(); str() of an int is exact.
    return repr(value) if isinstance(value, float) else str(value)


class MetricsWriter(ClosedOnExit):
    """Appends metrics records to a CSV file, one flushed line per record.

    Use as a context manager. Every ``write`` reaches the OS before it returns, so a crash of
    the writing process loses nothing already written.
    """

    def __init__(self, path: Path, *, append: bool = False) -> None:
        """Creates (or truncates) ``path`` and writes the header line.

        Args:
            path: the CSV file to write; its parent folder is created if missing.
            append: keep the rows of an existing ``path`` and add after them (a header is
                written only if the file is new or empty). A last line cut off mid-write (its
                writer was killed) is dropped first, and logged. The rows added continue the
                file's clock: each one's ``time_s`` is counted from the latest ``time_s``
                already there, so a resumed run's records follow the earlier ones in time
                instead of starting again at 0 among them.

        Raises:
            ValueError: ``append`` is set and ``path`` has a header other than
                ``METRIC_FIELDS`` (rows of two layouts must not mix in one file); the file is
                left as it was.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        has_rows = append and self.path.is_file() and self.path.stat().st_size > 0
        if has_rows:
            has_rows = _prepare_for_append(self.path)
        if not has_rows:
            # The file appears with its header (a rename): a reader of a live run folder (a
            # plot, a watcher) finds no file or a headed one, never an empty one.
            write_text_atomic(self.path, ",".join(METRIC_FIELDS) + "\n")
        # Every writer counts time_s from its own start; appended rows would otherwise
        # interleave with the earlier ones on a time axis.
        self._time_offset_s = _latest_time_s(self.path) if has_rows else 0.0
        # buffering=1 is line buffering: each row is handed to the OS at its newline.
        self._file = self.path.open("a", newline="", encoding="utf-8", buffering=1)
        self._csv = csv.writer(self._file, lineterminator="\n")

    def write(self, record: dict) -> None:
        """Writes one record as one CSV row and flushes it.

        Args:
            record: a dict as made by ``make_record``; missing fields are written empty.

        Raises:
            ValueError: the writer is closed, or the record has a field not in
                ``METRIC_FIELDS``.
            OSError: the row could not be written (a full disk), naming the file.
        """
        if self._file.closed:
            raise ValueError(f"metrics writer for {self.path} is closed")
        unknown = sorted(set(record) - set(METRIC_FIELDS))
        if unknown:
            raise ValueError(f"unknown metrics field(s) {unknown} in record for {self.path}")
        if self._time_offset_s and record.get("time_s") is not None:
            record = {**record, "time_s": float(record["time_s"]) + self._time_offset_s}
        try:
            self._csv.writerow([_format_cell(record.get(name)) for name in METRIC_FIELDS])
            self._file.flush()
        except OSError as e:  # a full disk: say of which file (a write's error names none)
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e

    @property
    def time_offset_s(self) -> float:
        """What this writer adds to each record's ``time_s``: the latest ``time_s`` the file
        had when appending began (0.0 for a new file)."""
        return self._time_offset_s

    def message(self, text: str, time_s: float | None = None) -> None:
        """Messages are for people: the CSV holds records only."""

    def close(self) -> None:
        """Flushes and closes the file; closing twice is harmless."""
        if not self._file.closed:
            try:
                self._file.close()
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e


_MAX_HEADER_BYTES = 64 * 1024
"""The longest first line read as a header: far past any layout's header."""
_MAX_SHOWN_HEADER = 1024
"""The longest first line an error message quotes."""


def _prepare_for_append(path: Path) -> bool:
    """Makes the existing ``path`` ready for rows to follow; returns whether it keeps a header.

    A file of another layout is refused, unchanged. A last line without its newline (cut off
    mid-write) is dropped, in place rather than by a rename: a process appending to the file
    meanwhile keeps writing to it. A file of an earlier layout is rewritten in this one (its
    rows keep their cells, the newer columns are empty), atomically.
    """
    end = _end_of_last_line(path)
    header = _appendable_header(path, end)
    with path.open("rb") as f:
        f.seek(end)
        torn = f.read()
    if torn:
        os.truncate(path, end)
        shown = torn.decode("utf-8", errors="replace")
        logger.warning("%s: dropped its last line, cut off mid-write: %r", path, shown[:200])
    if header != METRIC_FIELDS:
        _rewrite_in_this_layout(path, header)
    return end > 0


def _latest_time_s(path: Path, tail_bytes: int = 65536) -> float:
    """The largest ``time_s`` among the last rows of ``path`` (0.0 if none parses). Only its
    tail is read: rows are written about in time order, and a run's file can be large."""
    with path.open("rb") as f:
        start = max(0, f.seek(0, os.SEEK_END) - tail_bytes)
        f.seek(start)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    if start > 0:
        lines = lines[1:]  # begins mid-line: its first cell may be the end of a number
    latest = 0.0
    for line in lines:  # the header's first cell is no number
        try:
            time_s = float(line.split(",", 1)[0])
        except ValueError:
            continue
        if math.isfinite(time_s):
            latest = max(latest, time_s)
    return latest


def check_appendable(path: Path) -> None:
    """Check, changing nothing, that ``MetricsWriter(path, append=True)`` will accept ``path``:
    it is missing, empty, or has a metrics header (of this layout or an earlier one).

    Raises:
        ValueError: as ``MetricsWriter`` would, naming the file.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0:
        _appendable_header(path, _end_of_last_line(path))


def _appendable_header(path: Path, end: int) -> tuple[str, ...]:
    """The header rows appended to ``path`` go under (``end``: its last complete line's end)."""
    with path.open("rb") as f:
        # Bounded: a file of another kind may hold no newline for gigabytes.
        first_bytes = f.readline(_MAX_HEADER_BYTES + 1)
    if len(first_bytes) > _MAX_HEADER_BYTES:
        raise ValueError(f"{path}: cannot append, its first line is too long for a header")
    try:
        first_line = first_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: cannot append, not a UTF-8 text file (byte {e.start}: {e.reason})"
        ) from None
    header = tuple(next(csv.reader([first_line]), []))
    if end == 0 and ",".join(METRIC_FIELDS).startswith(first_line):
        return METRIC_FIELDS  # only part of the header was written: it goes below
    if header != METRIC_FIELDS and header not in _OLDER_HEADERS:
        shown = repr(header) if len(first_bytes) <= _MAX_SHOWN_HEADER else "(a long line)"
        raise ValueError(f"{path}: cannot append, its header {shown} is not {list(METRIC_FIELDS)}")
    return header


def _end_of_last_line(path: Path, block_bytes: int = 4096) -> int:
    """The offset just past the last newline of ``path`` (0 if it has none), read from the end:
    a run's file can be large, its last line is short."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - block_bytes)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


def _rewrite_in_this_layout(path: Path, header: tuple[str, ...]) -> None:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    padding = [""] * (len(METRIC_FIELDS) - len(header))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRIC_FIELDS)
    writer.writerows(row + padding for row in rows)
    write_text_atomic(path, buffer.getvalue())


def _parse_cell(path: Path, line_no: int, name: str, text: str) -> object:
    if name == "role":
        if text not in ROLES:
            raise ValueError(f"{path}, line {line_no}: column 'role' has unknown role {text!r}")
        return text
    if text == "":
        return None
    try:
        value: float | int = int(text) if name in _INT_FIELDS else float(text)
    except ValueError as e:
        raise ValueError(
            f"{path}, line {line_no}: column {name!r} has a value that is not a number: {text!r}"
        ) from e
    return value


def has_records(path: Path) -> bool:
    """Whether the ``metrics.csv`` at ``path`` holds a record: a line after its header (False
    when the file is missing). Reads no further than that line. Bytes that are no UTF-8 count
    as a line: ``read_metrics`` names the file they make unreadable."""
    try:
        with Path(path).open(newline="", encoding="utf-8", errors="replace") as f:
            f.readline()  # the header
            return any(line.strip() for line in f)
    except FileNotFoundError:
        return False


def check_metrics_header(path: Path) -> None:
    """Refuses a ``metrics.csv`` whose first line is no metrics header (reads that line only).

    Raises:
        ValueError: ``read_metrics``'s, naming the file.
    """
    with Path(path).open(newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline()
    _check_header(path, tuple(next(csv.reader([first]), [])) if first else None)


def _check_header(path: Path, header: tuple[str, ...] | None) -> None:
    """``header`` (None: the file has no line) is ``METRIC_FIELDS`` or an earlier version."""
    if header != METRIC_FIELDS and header not in _OLDER_HEADERS:
        shown = list(header) if header is not None else "(empty file)"
        raise ValueError(f"{path}: wrong metrics header {shown}; expected {list(METRIC_FIELDS)}")


def read_metrics(path: Path) -> list[dict[str, object]]:
    """Reads a ``metrics.csv`` back into records with numbers parsed.

    Args:
        path: the CSV file written by ``MetricsWriter``.

    Returns:
        One dict per row, keyed by ``METRIC_FIELDS``; int, float or None for numeric fields
        (None also for the columns an older file lacks).

    Raises:
        ValueError: the file is missing, its header is neither ``METRIC_FIELDS`` nor an
            earlier version of it, or a row is malformed (the message names the file, line
            and column). A last line without its newline (being written, or cut off by a
            killed writer) is skipped, and logged.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from e
    if text and not text.endswith("\n"):
        text, _, torn = text.rpartition("\n")
        logger.warning("%s: skipped its last line, cut off mid-write: %r", path, torn[:200])
    rows = list(csv.reader(io.StringIO(text)))
    _check_header(path, tuple(rows[0]) if rows else None)
    header = tuple(rows[0])
    records = []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {line_no}: expected {len(header)} cells, got {len(row)}"
            )
        cells = dict(zip(header, row, strict=True))
        records.append(
            {
                name: _parse_cell(path, line_no, name, cells[name]) if name in cells else None
                for name in METRIC_FIELDS
            }
        )
    return records
