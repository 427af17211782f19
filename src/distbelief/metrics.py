"""The metrics record of a run and its CSV file (``metrics.csv`` in the run folder).

Owns the field names, the record shape, and writing/reading the CSV. It knows nothing about
training, plotting or the terminal.
"""

from __future__ import annotations

import csv
import numbers
from pathlib import Path
from types import TracebackType

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
)
"""The CSV columns, in order. ``time_s`` is seconds since the run started; ``staleness`` is
the mean staleness of a worker's pushes since its previous record."""

ROLES = ("worker", "evaluator", "shard")
"""Who wrote a record. ``rank`` is the worker rank or shard id; the evaluator uses rank 0."""

_INT_FIELDS = frozenset({"rank", "step", "version"})


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


def make_record(role: str, rank: int, *, time_s: float, **fields: object) -> dict[str, object]:
    """Builds one metrics record with every field of ``METRIC_FIELDS``.

    Args:
        role: ``"worker"``, ``"evaluator"`` or ``"shard"``.
        rank: worker rank or shard id; 0 for the evaluator.
        time_s: seconds since the run started.
        **fields: any other fields of ``METRIC_FIELDS`` (``step``, ``loss``, ``accuracy``,
            ``test_loss``, ``test_accuracy``, ``version``). Fields not given are ``None``.

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


class MetricsWriter:
    """Appends metrics records to a CSV file, one flushed line per record.

    Use as a context manager. Every ``write`` reaches the OS before it returns, so a crash of
    the writing process loses nothing already written.
    """

    def __init__(self, path: Path) -> None:
        """Creates (or truncates) ``path`` and writes the header line.

        Args:
            path: the CSV file to write; its parent folder is created if missing.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # buffering=1 is line buffering: each row is handed to the OS at its newline.
        self._file = self.path.open("w", newline="", encoding="utf-8", buffering=1)
        self._csv = csv.writer(self._file, lineterminator="\n")
        self._csv.writerow(METRIC_FIELDS)
        self._file.flush()

    def write(self, record: dict) -> None:
        """Writes one record as one CSV row and flushes it.

        Args:
            record: a dict as made by ``make_record``; missing fields are written empty.

        Raises:
            ValueError: the writer is closed, or the record has a field not in
                ``METRIC_FIELDS``.
        """
        if self._file.closed:
            raise ValueError(f"metrics writer for {self.path} is closed")
        unknown = sorted(set(record) - set(METRIC_FIELDS))
        if unknown:
            raise ValueError(f"unknown metrics field(s) {unknown} in record for {self.path}")
        self._csv.writerow([_format_cell(record.get(name)) for name in METRIC_FIELDS])
        self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file; closing twice is harmless."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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


def read_metrics(path: Path) -> list[dict[str, object]]:
    """Reads a ``metrics.csv`` back into records with numbers parsed.

    Args:
        path: the CSV file written by ``MetricsWriter``.

    Returns:
        One dict per row, keyed by ``METRIC_FIELDS``; int, float or None for numeric fields.

    Raises:
        ValueError: the file is missing, its header is not ``METRIC_FIELDS``, or a row is
            malformed (the message names the file, line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != METRIC_FIELDS:
        header = rows[0] if rows else "(empty file)"
        raise ValueError(f"{path}: wrong metrics header {header}; expected {list(METRIC_FIELDS)}")
    records = []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(METRIC_FIELDS):
            raise ValueError(
                f"{path}, line {line_no}: expected {len(METRIC_FIELDS)} cells, got {len(row)}"
            )
        records.append(
            {
                name: _parse_cell(path, line_no, name, text)
                for name, text in zip(METRIC_FIELDS, row, strict=True)
            }
        )
    return records
