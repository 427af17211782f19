"""PNG plots of one run folder: accuracy, loss and throughput vs time, per worker and for the
parameter server, and the staleness histogram.

Reads only ``metrics.csv``, ``config.json`` and ``staleness.json`` of the folder and writes PNGs.
It uses matplotlib's object API with an explicit Agg canvas rather than pyplot, so it never
touches the process-wide backend or figure registry of whoever imports it. Comparing several
runs lives in ``distbelief.plots.compare``, on the helpers here.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distbelief.config import DEFAULT_MINIBATCH_SIZE, dotted_fields
from distbelief.files import write_files_atomic
from distbelief.telemetry.metrics import read_metrics

logger = logging.getLogger(__name__)

DPI = 110
FIGURE_SIZE_IN = (9.0, 5.0)
PS_LABEL = "PS (test)"
COORDINATOR_LABEL = "L-BFGS (batch)"
TESTED_MODEL_FIELD = "reporting.tested_model"
"""config.json's field naming the model the evaluator records measured: ``"worker"`` (the
worker's own replica, as ``examples/main.py``'s nodes test theirs), else the shards'
parameters."""
STALENESS_PNG = "staleness.png"
THROUGHPUT_PNG = "throughput_vs_time.png"

RATE_WINDOW_RECORDS = 3
"""A worker's throughput at a record is measured over this many of its previous records."""

Series = tuple[list[float], list[float]]
Records = list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True, slots=True)
class _PlotSpec:
    file_name: str
    worker_field: str
    """Field plotted once per worker (training metric of that worker's replica)."""
    ps_field: str
    """Evaluator field plotted for the parameter server's parameters."""
    y_label: str
    coordinator_field: str | None = None
    """Sandblaster's coordinator field plotted too (the batch loss of each iteration)."""


_PLOTS = (
    _PlotSpec(
        file_name="accuracy_vs_time.png",
        worker_field="accuracy",
        ps_field="test_accuracy",
        y_label="accuracy",
    ),
    _PlotSpec(
        file_name="loss_vs_time.png",
        worker_field="loss",
        ps_field="test_loss",
        y_label="loss (cross-entropy)",
        coordinator_field="loss",
    ),
)


AUC_PLOT = _PlotSpec(
    file_name="auc_vs_time.png", worker_field="auc", ps_field="test_auc", y_label="AUC"
)
"""Drawn for runs that record a click AUC (embedding-table models)."""


@dataclass(frozen=True, slots=True)
class RunData:
    """What the plots of one run folder read."""

    run_dir: Path
    records: Records
    config: dict[str, Any]
    """config.json's content as ``{"section.field": value}``, whether the file is sectioned
    or flat (as older runs wrote it); {} when the folder has none."""


def load_run(run_dir: Path | str) -> RunData:
    """Reads a run folder's ``metrics.csv`` and ``config.json``.

    Raises:
        ValueError: ``run_dir`` is not a folder or has no ``metrics.csv``, or ``metrics.csv``
            or ``config.json`` is malformed (the message names the folder or file).
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    try:
        if not run_dir.is_dir():
            what = "a file, not a folder" if run_dir.exists() else "no such folder"
            raise ValueError(f"not a run folder: {run_dir} ({what})")
        if metrics_path.is_dir():
            raise ValueError(f"not a run folder: {run_dir} (its metrics.csv is a folder)")
        if not metrics_path.is_file():
            raise ValueError(f"not a run folder: {run_dir} (no metrics.csv)")
    except OSError as e:  # a name too long for the file system, say
        raise ValueError(f"not a run folder: {run_dir} ({e.strerror or e})") from None
    return RunData(run_dir, read_metrics(metrics_path), _read_config(run_dir))


def _read_config(run_dir: Path) -> dict[str, Any]:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return dotted_fields(config)


def plot_run(run_dir: Path | str, *, out_dir: Path | str | None = None) -> list[Path]:
    """Plots a run folder's metrics: accuracy, loss and throughput vs time, and staleness.

    The accuracy and loss plots have one line per worker (its training metric vs ``time_s``),
    in a Sandblaster run the coordinator's batch loss per iteration (``"L-BFGS (batch)"``),
    and a thicker line with markers, ``"PS (test)"``, for the evaluator's test metric of the
    parameter server's parameters (``"worker N (test)"``, of worker N's own model, in a run
    without shards or whose config's ``reporting.tested_model`` is ``"worker"``). The
    throughput plot shows each worker's samples/s (steps/s when the batch size is unknown;
    portions/s in a Sandblaster run, whose steps are iterations) and their sum. The staleness
    histogram is drawn when the folder has a ``staleness.json``. Titles come from
    ``config.json`` when the folder has one.

    Args:
        run_dir: a run folder holding ``metrics.csv`` (and optionally ``config.json``).
        out_dir: where the PNGs go (created if missing); the run folder by default.

    Returns:
        The paths of the PNG files written: accuracy, loss, (AUC,) throughput, then
        staleness.

    Raises:
        ValueError: ``run_dir`` has no ``metrics.csv``, or ``metrics.csv``, ``config.json`` or
            ``staleness.json`` is malformed (the message names the file).
    """
    run = load_run(run_dir)
    out_path = Path(out_dir) if out_dir is not None else run.run_dir
    out_path.mkdir(parents=True, exist_ok=True)
    title = run_title(run.config, run.run_dir.name)
    alone = tests_own_replica(run.config)
    figures = {
        spec.file_name: _make_figure(run.records, spec, title, alone=alone) for spec in _PLOTS
    }
    if any(
        record.get("test_auc") is not None or record.get("auc") is not None
        for record in run.records
    ):
        figures[AUC_PLOT.file_name] = _make_figure(run.records, AUC_PLOT, title, alone=alone)
    figures[THROUGHPUT_PNG] = _make_throughput_figure(run, title)
    histogram = _read_staleness(run.run_dir)
    if histogram:
        figures[STALENESS_PNG] = _make_staleness_figure(histogram, title)
    written = [out_path / file_name for file_name in figures]
    save_pngs_atomic(dict(zip(written, figures.values(), strict=True)))
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def tests_own_replica(config: dict[str, Any]) -> bool:
    """Whether a run's test metrics are of a worker's own replica, not the PS's parameters: a
    run without shards (``examples/main.py --no-distributed``), or one whose config says so
    (the example's nodes test their own replicas)."""
    return (
        config.get(TESTED_MODEL_FIELD) == "worker"
        or _config_value(config, ("cluster.num_shards", "shards")) == 0
    )


def new_figure(*, height_in: float = FIGURE_SIZE_IN[1]) -> tuple[Figure, Axes]:
    """A figure of the standard width bound to an Agg canvas, and its one axes."""
    figure = Figure(figsize=(FIGURE_SIZE_IN[0], height_in), dpi=DPI)
    FigureCanvasAgg(figure)  # binds the Agg canvas to the figure; savefig renders with it.
    return figure, figure.add_subplot()


def series_by_rank(records: Records, role: str, field: str) -> dict[int, Series]:
    """Returns ``{rank: (times_s, values)}`` for one role's non-empty ``field``, time-ordered."""
    series: dict[int, Series] = {}
    for record in sorted(records, key=lambda r: r["time_s"]):
        if record["role"] == role and record[field] is not None:
            times_s, values = series.setdefault(record["rank"], ([], []))
            times_s.append(record["time_s"])
            values.append(record[field])
    return dict(sorted(series.items()))


def lone_point_marker(times_s: list[float]) -> str | None:
    """A marker for a series of one point, which a line alone does not draw (a worker that
    logged once, a rate measured between two records): the legend named a curve that was not
    there."""
    return "o" if len(times_s) == 1 else None


def _worker_line(axes, times_s: list[float], values: list[float], label: str) -> None:
    """One worker's thin, translucent curve (a lone point marked, or it would not show)."""
    axes.plot(
        times_s, values, linewidth=1.0, alpha=0.75, marker=lone_point_marker(times_s), label=label
    )


def _make_figure(records: Records, spec: _PlotSpec, title: str, *, alone: bool = False) -> Figure:
    """``alone``: the evaluator records measured the worker's own model, not the PS's."""
    figure, axes = new_figure()
    workers = series_by_rank(records, "worker", spec.worker_field)
    for rank, (times_s, values) in workers.items():
        _worker_line(axes, times_s, values, f"worker {rank} (train)")
    coordinator = {}
    if spec.coordinator_field is not None:
        coordinator = series_by_rank(records, "coordinator", spec.coordinator_field)
    for times_s, values in coordinator.values():
        axes.plot(times_s, values, linewidth=1.5, marker=".", label=COORDINATOR_LABEL)
    evaluator = series_by_rank(records, "evaluator", spec.ps_field)
    for rank, (times_s, values) in evaluator.items():
        # Drawn last and on top: it is the model the run produces, the workers are context.
        axes.plot(
            times_s,
            values,
            color="black",
            linewidth=2.5,
            marker="o",
            markersize=4,
            zorder=3,
            label=f"worker {rank} (test)" if alone else PS_LABEL,
        )
    style_axes(axes, spec.y_label, title, has_data=bool(workers or evaluator or coordinator))
    figure.tight_layout()
    return figure


def style_axes(axes: Axes, y_label: str, title: str, *, has_data: bool) -> None:
    """Labels, grid, a 0-based time axis, a 0..1 scale for accuracy, and a legend outside."""
    axes.set_xlabel("time (seconds)")
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize="medium")
    axes.grid(True, alpha=0.3)
    axes.set_xlim(left=0.0)
    if "accuracy" in y_label:
        low, high = axes.get_ylim()
        if has_data and low >= -0.05 and high <= 1.05:
            axes.set_ylim(0.0, 1.02)  # a fixed 0..1 scale makes runs comparable at a glance.
    if not has_data:
        axes.text(0.5, 0.5, "no data yet", transform=axes.transAxes, ha="center", va="center")
        return
    if not axes.get_legend_handles_labels()[0]:
        return  # nothing labelled (a --no-eval run's one final point): matplotlib warned
    # Outside the axes so the legend never hides a curve, however many lines there are.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def batch_size_of(config: dict[str, Any]) -> int | None:
    """A Downpour run's mini-batch size from its config (its default when none was given)."""
    if config.get("optimizer.algorithm", "downpour") != "downpour":
        return None
    value = config.get("optimizer.batch_size", DEFAULT_MINIBATCH_SIZE)
    value = DEFAULT_MINIBATCH_SIZE if value is None else value
    return value if isinstance(value, int) and value > 0 else None


def rates_by_life(times_s: list[float], steps: list[float]) -> list[Series]:
    """A worker's steps/s at each of its records, over its ``RATE_WINDOW_RECORDS`` previous
    records of the same life, one series per life: a life ends as the step goes back (a
    worker restarted, or a run resumed), a window never reaches back past it, and nothing
    stands for the time between lives (a worker not running, which a line across, or a sum
    interpolating over it, drew at its old rate)."""
    starts = [0, *(i for i in range(1, len(steps)) if steps[i] < steps[i - 1]), len(steps)]
    lives = []
    for start, end in itertools.pairwise(starts):
        rate_times_s, rates = [], []
        for i in range(start + 1, end):
            first = max(start, i - RATE_WINDOW_RECORDS)
            elapsed_s = times_s[i] - times_s[first]
            if elapsed_s > 0:
                rate_times_s.append(times_s[i])
                rates.append((steps[i] - steps[first]) / elapsed_s)
        if rate_times_s:
            lives.append((rate_times_s, rates))
    return lives


def total_rate(records: Records) -> Series:
    """Steps/s of all workers together: each worker's ``rates_by_life`` interpolated onto the
    union of their times and summed (a worker counts 0 outside each of its lives' first..last
    rate: before it starts, after it ends, and between a restart's lives)."""
    return _summed_rates(replica_steps(records).values())


def replica_steps(records: Records) -> dict[int, Series]:
    """``{rank: (times_s, steps)}`` of each worker; of a partitioned replica, its last stage's
    rows alone. Every stage reports the same steps on its own clock (an earlier stage runs
    ahead): interleaved, a rate over a few records would swing between half and twice the
    replica's."""
    last_stage = max(
        (r["stage"] for r in records if r["role"] == "worker" and r.get("stage") is not None),
        default=None,
    )
    if last_stage is not None:
        records = [r for r in records if r["role"] != "worker" or r.get("stage") == last_stage]
    return series_by_rank(records, "worker", "step")


def _summed_rates(counts: Iterable[Series]) -> Series:
    """The ``rates_by_life`` of each ``(times_s, count so far)`` series, summed onto the union
    of their times (a series counts 0 outside each life's first..last rate). Between two lives
    of a worker the sum has a point just after the one ends and one just before the next
    starts: drawn, it steps down and up there, not across the gap at the old rate."""
    lives = []
    edges_s = []
    for times_s, counted in counts:
        worker_lives = rates_by_life(times_s, counted)
        lives += worker_lives
        for (before, _), (after, _) in itertools.pairwise(worker_lives):
            edges_s += [np.nextafter(before[-1], np.inf), np.nextafter(after[0], -np.inf)]
    if not lives:
        return [], []
    grid_s = np.unique(np.concatenate([np.asarray(t) for t, _ in lives] + [np.asarray(edges_s)]))
    total = np.zeros_like(grid_s)
    for times_s, rates in lives:
        total += np.interp(grid_s, times_s, rates, left=0.0, right=0.0)
    return grid_s.tolist(), total.tolist()


def portions_so_far(records: Records) -> dict[int, Series]:
    """A Sandblaster run's ``{rank: (times_s, portions committed so far)}``: its workers' rows
    carry the portions committed in each iteration (their ``step`` is the iteration, the same
    for every worker, so steps/s would show each worker at the coordinator's rate)."""
    return {
        rank: (times_s, np.cumsum(portions).tolist())
        for rank, (times_s, portions) in series_by_rank(records, "worker", "portions").items()
    }


def time_bin_s(records: Records) -> float:
    """A time bin for averaging over workers: about 25 bins over the run, at least 0.5 s."""
    times_s = [r["time_s"] for r in records if r["role"] == "worker"]
    return max(0.5, (max(times_s) / 25.0) if times_s else 0.5)


def _make_throughput_figure(run: RunData, title: str) -> Figure:
    figure, axes = new_figure()
    if is_sandblaster(run.config, run.records):
        scale, unit = 1, "portions/s"
        workers = portions_so_far(run.records)
    else:
        batch_size = batch_size_of(run.config)
        scale = batch_size or 1
        unit = "samples/s" if batch_size else "steps/s"
        workers = replica_steps(run.records)
    for rank, (times_s, steps) in workers.items():
        color = None  # each life drawn on its own (a life of one rate is a point), one colour
        for life, (rate_times_s, rates) in enumerate(rates_by_life(times_s, steps)):
            [line] = axes.plot(
                rate_times_s,
                [rate * scale for rate in rates],
                linewidth=1.0,
                alpha=0.75,
                marker=lone_point_marker(rate_times_s),
                color=color,
                label=f"worker {rank}" if life == 0 else None,
            )
            color = line.get_color()
    if len(workers) > 1:
        grid_s, totals = _summed_rates(workers.values())
        axes.plot(
            grid_s,
            [rate * scale for rate in totals],
            color="black",
            linewidth=2.0,
            marker=lone_point_marker(grid_s),
            label="all workers",
        )
    style_axes(axes, f"throughput ({unit})", title, has_data=bool(workers))
    axes.set_ylim(bottom=0.0)
    figure.tight_layout()
    return figure


def is_sandblaster(config: dict[str, Any], records: Records) -> bool:
    """Whether a run is Sandblaster L-BFGS: its config says so, or (a folder without
    ``config.json``) its metrics have coordinator rows."""
    if "optimizer.algorithm" in config:
        return config["optimizer.algorithm"] == "sandblaster"
    return any(record["role"] == "coordinator" for record in records)


def _read_staleness(run_dir: Path) -> dict[int, int]:
    """Pushes per staleness, summed over shards, from ``staleness.json`` ({} if absent)."""
    path = run_dir / "staleness.json"
    if not path.is_file():
        return {}
    try:
        per_shard = json.loads(path.read_text(encoding="utf-8"))
        _check_staleness_shape(per_shard)
        total: dict[int, int] = {}
        for histogram in per_shard.values():
            for staleness, count in histogram.items():
                total[int(staleness)] = total.get(int(staleness), 0) + int(count)
    except (ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not a staleness histogram: {e}") from e
    return dict(sorted(total.items()))


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words (int and float are both a number)."""
    if value is None:
        return "null"
    return _JSON_KINDS.get(type(value), "a number")


def _check_staleness_shape(per_shard: object) -> None:
    """Raises ValueError saying what was expected where the file is not an object of objects
    (``[]`` read as 'list' object has no attribute 'values', which names no file content)."""
    expected = "expected an object of shards, each an object of staleness -> count"
    if not isinstance(per_shard, dict):
        raise ValueError(f"{expected}; it holds {_json_kind(per_shard)}")
    for shard, histogram in per_shard.items():
        if not isinstance(histogram, dict):
            raise ValueError(f"{expected}; shard {shard!r} holds {_json_kind(histogram)}")


def _make_staleness_figure(histogram: dict[int, int], title: str) -> Figure:
    figure, axes = new_figure()
    axes.bar(list(histogram), list(histogram.values()), width=0.8, color="tab:blue")
    total = sum(histogram.values())
    mean = sum(s * c for s, c in histogram.items()) / total
    axes.set_title(
        f"{title}\nstaleness of {total} pushes (all shards): mean {mean:.2f}", fontsize=11
    )
    axes.set_xlabel("staleness (updates applied between fetch and push)")
    axes.set_ylabel("pushes")
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def _config_value(config: dict[str, Any], names: tuple[str, ...]) -> object:
    """Looks ``names`` up at the top level of ``config``, then one level down."""
    scopes = [config, *(v for v in config.values() if isinstance(v, dict))]
    for scope in scopes:
        for name in names:
            value = scope.get(name)
            if isinstance(value, dict):
                value = value.get("name")
            if value is not None:
                return value
    return None


def run_title(config: dict[str, Any], fallback: str) -> str:
    """ "<model> on <dataset>, <W> workers, <S> shards" from a run's config, else ``fallback``."""
    model = _config_value(config, ("model.name", "model_name"))
    dataset = _config_value(config, ("data.name", "dataset_name"))
    num_workers = _config_value(config, ("cluster.num_workers", "workers"))
    num_shards = _config_value(config, ("cluster.num_shards", "shards"))
    what = " on ".join(str(v) for v in (model, dataset) if v is not None) or fallback
    counts = [
        f"{count} {noun}{'' if count == 1 else 's'}"
        for count, noun in ((num_workers, "worker"), (num_shards, "shard"))
        if count is not None
    ]
    return ", ".join([what, *counts])


def save_pngs_atomic(figures: Mapping[Path, Figure]) -> None:
    """Saves each figure to a temp file in its folder, then renames them, so readers never see
    half a PNG, and a PNG that cannot be written (a folder by its name, a full disk) leaves
    none of the others new; an OSError names the PNG."""

    def saver(figure: Figure) -> Callable[[Path], None]:
        return lambda tmp: figure.savefig(tmp, format="png", dpi=DPI)

    write_files_atomic({path: saver(figure) for path, figure in figures.items()})
