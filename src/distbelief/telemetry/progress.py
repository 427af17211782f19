"""Live progress of a run in the terminal, fed with metrics records.

On a terminal it draws a rich dashboard; elsewhere (CI, files) it writes plain ``key=value``
lines (and never imports rich). It is a ``Sink``; it only displays: it never writes run files
and never talks to processes.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

from distbelief.telemetry.metrics import ROLES, SHARD_FIGURES
from distbelief.telemetry.sink import ClosedOnExit

RATE_WINDOW_S = 5.0
"""Steps/s is measured over the records of (about) this many recent seconds."""

REFRESH_PER_S = 4.0
"""Redraws of the interactive display per second; more only costs CPU in the launcher."""


@dataclass
class _WorkerState:
    step: int = 0
    loss: float | None = None
    accuracy: float | None = None
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=1024))
    """(time_s, step) of recent records, for steps/s."""
    rate_stage: int | None = None
    """A partitioned replica's stages each report the same steps, on their own clocks: steps/s
    follows one of them, the last seen (the one with the loss), not their interleaved records
    (two at one step read as 0 steps/s)."""
    portions: int | None = None
    """A Sandblaster worker's portions committed so far (None: a Downpour worker). Its step is
    the coordinator's iteration, the same for every worker: its own rate is portions/s."""
    portion_samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=1024))
    """(time_s, portions so far) of recent records, for portions/s."""

    def observe(self, record: dict[str, Any]) -> None:
        if record.get("loss") is not None:
            self.loss = record["loss"]
        if record.get("accuracy") is not None:
            self.accuracy = record["accuracy"]
        step = record.get("step")
        if step is None:
            return
        time_s = float(record["time_s"])
        if record.get("portions") is not None:
            self.portions = (self.portions or 0) + int(record["portions"])
            _add_sample(self.portion_samples, time_s, self.portions)
        stage = record.get("stage")
        self.step = step if stage is None else max(self.step, step)
        if stage is not None:
            if self.rate_stage is None or stage > self.rate_stage:
                self.rate_stage = stage
                self.samples.clear()
            elif stage != self.rate_stage:
                return
        _add_sample(self.samples, time_s, step)

    def steps_per_s(self) -> float | None:
        return _rate(self.samples)

    def rate(self) -> tuple[str, float | None]:
        """What this worker's rate counts (``steps``, or a Sandblaster worker's ``portions``),
        and its value per second."""
        if self.portions is not None:
            return "portions", _rate(self.portion_samples)
        return "steps", self.steps_per_s()


def _add_sample(samples: deque[tuple[float, int]], time_s: float, count: int) -> None:
    samples.append((time_s, count))
    # Keep one sample at or before the window start so the rate spans the whole window.
    while len(samples) > 2 and samples[1][0] <= time_s - RATE_WINDOW_S:
        samples.popleft()


def _rate(samples: deque[tuple[float, int]]) -> float | None:
    """Counted per second over the samples' window (None: too few, or no time between)."""
    if len(samples) < 2:
        return None
    (first_time_s, first), (last_time_s, last) = samples[0], samples[-1]
    if last_time_s <= first_time_s:
        return None
    return (last - first) / (last_time_s - first_time_s)


@dataclass
class _ShardState:
    """A shard's latest counters, from the launcher's polls of its STATS."""

    version: int | None = None
    pushes_per_s: float | None = None
    bytes_per_s: float | None = None
    staleness: float | None = None
    """Mean staleness of the pushes since the previous poll."""
    rows: int | None = None
    """Embedding rows held now, over the shard's tables (None: no tables)."""
    rows_admitted: int | None = None
    rows_evicted: int | None = None
    rows_pending: int | None = None
    """Ids awaiting admission (``--admit-after``), over the shard's tables."""

    def observe(self, record: dict[str, Any]) -> None:
        for name in ("version", *SHARD_FIGURES):
            if record.get(name) is not None:
                setattr(self, name, record[name])


@dataclass
class _RunState:
    num_workers: int
    total_steps: int
    time_s: float = 0.0
    """Latest ``time_s`` seen in any record: the run's elapsed time."""
    workers: dict[int, _WorkerState] = field(default_factory=dict)
    shards: dict[int, _ShardState] = field(default_factory=dict)
    """Shards in id order; one appears with its first record."""
    test_accuracy: float | None = None
    test_loss: float | None = None
    test_auc: float | None = None
    version: int | None = None
    iteration: int | None = None
    """Sandblaster: the coordinator's last L-BFGS iteration (None in a Downpour run)."""
    iteration_loss: float | None = None
    grad_norm: float | None = None

    def __post_init__(self) -> None:
        # Workers that have not reported yet still show up, at step 0.
        for rank in range(self.num_workers):
            self.workers[rank] = _WorkerState()

    def observe(self, record: dict[str, Any]) -> None:
        self.time_s = max(self.time_s, float(record["time_s"]))
        if record["role"] == "worker":
            rank = record["rank"]
            if rank not in self.workers:
                # A rank beyond num_workers (a replacement worker): keep rows in rank order.
                self.workers = dict(sorted({**self.workers, rank: _WorkerState()}.items()))
            self.workers[rank].observe(record)
        elif record["role"] == "shard":
            shard_id = record["rank"]
            if shard_id not in self.shards:
                self.shards = dict(sorted({**self.shards, shard_id: _ShardState()}.items()))
            self.shards[shard_id].observe(record)
        elif record["role"] == "evaluator":
            self.test_accuracy = record.get("test_accuracy")
            self.test_loss = record.get("test_loss")
            self.test_auc = record.get("test_auc")
            self.version = record.get("version")
        elif record["role"] == "coordinator":
            self.iteration = record.get("step")
            self.iteration_loss = record.get("loss")
            self.grad_norm = record.get("grad_norm")

    def steps_done(self) -> int:
        """Workers' steps summed; in a Sandblaster run, the coordinator's iterations."""
        if self.iteration is not None:
            return self.iteration
        return sum(worker.step for worker in self.workers.values())

    def eta_s(self) -> float | None:
        done = self.steps_done()
        if done <= 0 or self.time_s <= 0.0:
            return None
        return max(0, self.total_steps - done) * self.time_s / done


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _progress_line(state: _RunState, time_offset_s: float) -> str:
    """One ``progress`` line; fields with no value yet are left out rather than faked."""
    parts = [
        f"progress t={state.time_s + time_offset_s:.1f}s",
        f"steps={state.steps_done()}/{state.total_steps}",
    ]
    eta_s = state.eta_s()
    if eta_s is not None:
        parts.append(f"eta={eta_s:.1f}s")
    for rank, worker in state.workers.items():
        parts.append(f"worker{rank}.step={worker.step}")
        counted, rate = worker.rate()
        if rate is not None:
            parts.append(f"worker{rank}.{counted}_per_s={rate:.2f}")
        if worker.loss is not None:
            parts.append(f"worker{rank}.loss={worker.loss:.4g}")
        if worker.accuracy is not None:
            parts.append(f"worker{rank}.acc={worker.accuracy:.4f}")
    if state.iteration is not None:
        parts.append(f"lbfgs.iteration={state.iteration}")
        for key, value in (("loss", state.iteration_loss), ("grad_norm", state.grad_norm)):
            if value is not None:
                parts.append(f"lbfgs.{key}={value:.4g}")
    if state.test_accuracy is not None:
        parts.append(f"ps.test_acc={state.test_accuracy:.4f}")
    if state.test_auc is not None:
        parts.append(f"ps.test_auc={state.test_auc:.4f}")
    for shard_id, shard in state.shards.items():
        for key, value, spec in (
            ("version", shard.version, "d"),
            ("pushes_per_s", shard.pushes_per_s, ".1f"),
            ("bytes_per_s", shard.bytes_per_s, ".0f"),
            ("staleness", shard.staleness, ".2f"),
            ("rows", shard.rows, "d"),
            ("rows_admitted", shard.rows_admitted, "d"),
            ("rows_evicted", shard.rows_evicted, "d"),
            ("rows_pending", shard.rows_pending, "d"),
        ):
            if value is not None:
                parts.append(f"shard{shard_id}.{key}={value:{spec}}")
    return " ".join(parts)


def _eval_line(record: dict[str, Any], time_offset_s: float) -> str:
    parts = [f"eval t={float(record['time_s']) + time_offset_s:.1f}s"]
    if record.get("version") is not None:
        parts.append(f"version={record['version']}")
    if record.get("test_loss") is not None:
        parts.append(f"test_loss={record['test_loss']:.4g}")
    if record.get("test_accuracy") is not None:
        parts.append(f"test_acc={record['test_accuracy']:.4f}")
    if record.get("test_auc") is not None:
        parts.append(f"test_auc={record['test_auc']:.4f}")
    return " ".join(parts)


class _Dashboard:
    """The interactive renderable; rebuilt from the shared state at every refresh of ``Live``."""

    def __init__(self, state: _RunState, lock: threading.Lock, progress: Any) -> None:
        self._state = state
        self._lock = lock
        self._progress = progress

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        # Live refreshes on its own thread while update() mutates the state on the caller's.
        with self._lock:
            tables = [self._table()]
            if self._state.shards:
                tables.append(self._shard_table())
            ps_line = self._ps_line()
        return Group(self._progress, *tables, Text(ps_line))

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        counted = next(iter(self._state.workers.values())).rate()[0]
        for header in ("worker", "step", f"{counted}/s", "loss", "accuracy"):
            table.add_column(header, justify="left" if header == "worker" else "right")
        for rank, worker in self._state.workers.items():
            table.add_row(
                str(rank),
                str(worker.step),
                _fmt(worker.rate()[1], ".1f"),
                _fmt(worker.loss, ".4g"),
                _fmt(worker.accuracy, ".4f"),
            )
        return table

    def _shard_table(self) -> Any:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        with_rows = any(shard.rows is not None for shard in self._state.shards.values())
        headers = ["shard", "version", "pushes/s", "MB/s", "staleness"]
        headers += ["rows", "admitted", "evicted", "pending"] if with_rows else []
        for header in headers:
            table.add_column(header, justify="left" if header == "shard" else "right")
        for shard_id, shard in self._state.shards.items():
            mb_per_s = None if shard.bytes_per_s is None else shard.bytes_per_s / 1e6
            cells = [
                str(shard_id),
                _fmt(shard.version, "d"),
                _fmt(shard.pushes_per_s, ".1f"),
                _fmt(mb_per_s, ".2f"),
                _fmt(shard.staleness, ".2f"),
            ]
            if with_rows:
                cells += [
                    _fmt(shard.rows, "d"),
                    _fmt(shard.rows_admitted, "d"),
                    _fmt(shard.rows_evicted, "d"),
                    _fmt(shard.rows_pending, "d"),
                ]
            table.add_row(*cells)
        return table

    def _ps_line(self) -> str:
        state = self._state
        lbfgs = ""
        if state.iteration is not None:
            lbfgs = (
                f"L-BFGS iteration {state.iteration}: loss {_fmt(state.iteration_loss, '.4g')}, "
                f"gradient norm {_fmt(state.grad_norm, '.3g')}\n"
            )
        if state.test_accuracy is None:
            return lbfgs + "PS test accuracy: waiting for the evaluator"
        auc = "" if state.test_auc is None else f", test AUC {state.test_auc:.4f}"
        return lbfgs + (
            f"PS test accuracy {state.test_accuracy:.4f} "
            f"(test loss {_fmt(state.test_loss, '.4g')}{auc}, version {state.version})"
        )


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (False for one that cannot say)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ProgressDisplay(ClosedOnExit):
    """Shows a run's progress from its metrics records; use as a context manager.

    Interactive mode draws a rich progress bar (steps summed over workers, elapsed, ETA), a
    table (per worker step, steps/s, loss, accuracy), one of the shards (version, pushes/s,
    MB/s, mean staleness) once ``shard`` records arrive, and the evaluator's last test accuracy.
    Non-interactive mode writes ``progress ...`` lines at most every ``log_every_s`` seconds of
    run time (with ``shard<id>.version``, ``.pushes_per_s``, ``.bytes_per_s`` and
    ``.staleness`` fields once shards report), one ``eval ...`` line per evaluator record, and
    ``message ...`` lines, all of the form ``<kind> key=value ...`` with no escape codes.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        num_workers: int,
        interactive: bool | None = None,
        stream: TextIO | None = None,
        log_every_s: float = 2.0,
    ) -> None:
        """Sets up the display; nothing is drawn before ``__enter__``.

        Args:
            total_steps: steps of all workers together at which the run is done.
            num_workers: workers expected; each shows from the start, at step 0.
            interactive: rich dashboard if True, log lines if False; None asks
                ``stream.isatty()``.
            stream: where to write; ``sys.stderr`` by default.
            log_every_s: least run time between two ``progress`` lines (non-interactive).

        Raises:
            ValueError: ``total_steps`` < 1, ``num_workers`` < 1 or ``log_every_s`` < 0.
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if log_every_s < 0:
            raise ValueError(f"log_every_s must be >= 0, got {log_every_s}")
        self._stream = sys.stderr if stream is None else stream
        self.interactive = is_terminal(self._stream) if interactive is None else interactive
        self._log_every_s = log_every_s
        self._state = _RunState(num_workers=num_workers, total_steps=total_steps)
        self._lock = threading.Lock()
        self._last_log_time_s: float | None = None
        self._unlogged = False
        self._live: Any = None
        self.time_offset_s = 0.0
        """Added to every ``t=`` written: a resumed run's metrics.csv goes on from the time
        its last run ended, and the lines keep to its time axis (records come in from 0)."""
        if self.interactive:
            self._setup_live()

    def _setup_live(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._console = Console(file=self._stream, force_terminal=True)
        self._progress = Progress(
            TextColumn("steps"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
        )
        self._task_id = self._progress.add_task("steps", total=self._state.total_steps)
        # Redirecting sys.stdout/sys.stderr through the console keeps stray prints from tearing
        # the display, but only makes sense when the display owns one of them.
        redirect = self._stream in (sys.stdout, sys.stderr)
        self._live = Live(
            _Dashboard(self._state, self._lock, self._progress),
            console=self._console,
            refresh_per_second=REFRESH_PER_S,
            redirect_stdout=redirect,
            redirect_stderr=redirect,
        )

    def __enter__(self) -> ProgressDisplay:
        if self._live is not None:
            self._live.start()
        return self

    def close(self) -> None:
        """Stops the display, leaving the last state on screen (or in one last log line)."""
        if self._live is not None:
            self._live.stop()
            return
        with self._lock:
            if self._unlogged:
                self._write_line(_progress_line(self._state, self.time_offset_s))
                self._unlogged = False

    def write(self, record: dict) -> None:
        """Takes in one metrics record, as made by ``distbelief.telemetry.make_record``.

        Args:
            record: a metrics record: a worker's, the evaluator's or a shard's.

        Raises:
            ValueError: the record's role is not one of ``distbelief.telemetry.ROLES``.
        """
        role = record.get("role")
        if role not in ROLES:
            raise ValueError(f"progress record has unknown role {role!r}; expected {ROLES}")
        with self._lock:
            self._state.observe(record)
            steps_done = self._state.steps_done()
            if self._live is None:
                self._log_record(record)
        if self._live is not None:
            self._progress.update(self._task_id, completed=min(steps_done, self._state.total_steps))

    def _log_record(self, record: dict[str, Any]) -> None:
        if record["role"] == "evaluator":
            self._write_line(_eval_line(record, self.time_offset_s))
        else:
            self._unlogged = True
            self._log_progress_if_due()

    def _log_progress_if_due(self) -> None:
        time_s = self._state.time_s
        last_s = self._last_log_time_s
        if last_s is not None and time_s - last_s < self._log_every_s:
            return
        self._last_log_time_s = time_s
        self._unlogged = False
        self._write_line(_progress_line(self._state, self.time_offset_s))

    def message(self, text: str, time_s: float | None = None) -> None:
        """Shows a one-off line, such as ``"worker 1 exited"``.

        Args:
            text: the message; in non-interactive mode it is written JSON-quoted as ``text=``.
            time_s: when it happened on the records' clock, written as ``t=`` (moved on by
                ``time_offset_s``, as every line); None: the latest record's time.
        """
        if self._live is not None:
            # markup/highlight off: the text is data (paths, brackets), not rich markup.
            self._console.print(text, markup=False, highlight=False)
            return
        # json.dumps quotes and escapes control characters, so a line stays one parseable line.
        with self._lock:
            at_s = (self._state.time_s if time_s is None else time_s) + self.time_offset_s
            self._write_line(f"message t={at_s:.1f}s text={json.dumps(text)}")

    def _write_line(self, line: str) -> None:
        # The stream, not logging: this output is the product, and its format is pinned.
        self._stream.write(line + "\n")
        self._stream.flush()
