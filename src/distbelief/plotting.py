"""PNG plots of a run folder: accuracy and loss vs time, per worker and for the parameter server.

Reads only ``metrics.csv`` and ``config.json`` of the folder and writes PNGs next to them. It uses
matplotlib's object API with an explicit Agg canvas rather than pyplot, so it never touches the
process-wide backend or figure registry of whoever imports it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distbelief.metrics import read_metrics

logger = logging.getLogger(__name__)

DPI = 110
FIGURE_SIZE_IN = (9.0, 5.0)
PS_LABEL = "PS (test)"


@dataclass(frozen=True, kw_only=True, slots=True)
class _PlotSpec:
    file_name: str
    worker_field: str
    """Field plotted once per worker (training metric of that worker's replica)."""
    ps_field: str
    """Evaluator field plotted for the parameter server's parameters."""
    y_label: str


_PLOTS = (
    _PlotSpec(
        file_name="accuracy_vs_time.png",
        worker_field="accuracy",
        ps_field="test_accuracy",
        y_label="accuracy",
    ),
    _PlotSpec(
        file_name="loss_vs_time.png", worker_field="loss", ps_field="test_loss", y_label="loss"
    ),
)

Series = tuple[list[float], list[float]]
STALENESS_PNG = "staleness.png"


def _read_staleness(run_dir: Path) -> dict[int, int]:
    """Pushes per staleness, summed over shards, from ``staleness.json`` ({} if absent)."""
    path = run_dir / "staleness.json"
    if not path.is_file():
        return {}
    try:
        per_shard = json.loads(path.read_text(encoding="utf-8"))
        total: dict[int, int] = {}
        for histogram in per_shard.values():
            for staleness, count in histogram.items():
                total[int(staleness)] = total.get(int(staleness), 0) + int(count)
    except (ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not a staleness histogram: {e}") from e
    return dict(sorted(total.items()))


def _make_staleness_figure(histogram: dict[int, int], title: str) -> Figure:
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
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


def plot_run(run_dir: Path) -> list[Path]:
    """Plots a run folder's metrics to ``accuracy_vs_time.png`` and ``loss_vs_time.png``.

    Each plot has one line per worker (its training metric vs ``time_s``) and a thicker line
    with markers, ``"PS (test)"``, for the evaluator's test metric of the parameter server's
    parameters. The title comes from ``config.json`` when the folder has one.

    Args:
        run_dir: a run folder holding ``metrics.csv`` (and optionally ``config.json``).

    Returns:
        The paths of the PNG files written, accuracy first.

    Raises:
        ValueError: ``run_dir`` has no ``metrics.csv``, or ``metrics.csv`` or ``config.json``
            is malformed (the message names the file).
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise ValueError(f"not a run folder: {run_dir} (no metrics.csv)")
    records: list[dict[str, Any]] = read_metrics(metrics_path)
    title = _run_title(run_dir)
    written = []
    for spec in _PLOTS:
        figure = _make_figure(records, spec, title)
        path = run_dir / spec.file_name
        _save_png_atomic(figure, path)
        written.append(path)
    histogram = _read_staleness(run_dir)
    if histogram:
        path = run_dir / STALENESS_PNG
        _save_png_atomic(_make_staleness_figure(histogram, title), path)
        written.append(path)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def _series_by_rank(records: list[dict[str, Any]], role: str, field: str) -> dict[int, Series]:
    """Returns ``{rank: (times_s, values)}`` for one role's non-empty ``field``, time-ordered."""
    series: dict[int, Series] = {}
    for record in sorted(records, key=lambda r: r["time_s"]):
        if record["role"] == role and record[field] is not None:
            times_s, values = series.setdefault(record["rank"], ([], []))
            times_s.append(record["time_s"])
            values.append(record[field])
    return dict(sorted(series.items()))


def _make_figure(records: list[dict[str, Any]], spec: _PlotSpec, title: str) -> Figure:
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI)
    FigureCanvasAgg(figure)  # binds the Agg canvas to the figure; savefig renders with it.
    axes = figure.add_subplot()
    workers = _series_by_rank(records, "worker", spec.worker_field)
    for rank, (times_s, values) in workers.items():
        axes.plot(times_s, values, linewidth=1.0, alpha=0.75, label=f"worker {rank} (train)")
    evaluator = _series_by_rank(records, "evaluator", spec.ps_field)
    for times_s, values in evaluator.values():
        # Drawn last and on top: it is the model the run produces, the workers are context.
        axes.plot(
            times_s,
            values,
            color="black",
            linewidth=2.5,
            marker="o",
            markersize=4,
            zorder=3,
            label=PS_LABEL,
        )
    _style_axes(axes, spec, title, has_data=bool(workers or evaluator))
    figure.tight_layout()
    return figure


def _style_axes(axes: Axes, spec: _PlotSpec, title: str, *, has_data: bool) -> None:
    axes.set_xlabel("time (seconds)")
    axes.set_ylabel(spec.y_label)
    axes.set_title(title, fontsize="medium")
    axes.grid(True, alpha=0.3)
    axes.set_xlim(left=0.0)
    if spec.y_label == "accuracy":
        low, high = axes.get_ylim()
        if has_data and low >= -0.05 and high <= 1.05:
            axes.set_ylim(0.0, 1.02)  # a fixed 0..1 scale makes runs comparable at a glance.
    if not has_data:
        axes.text(0.5, 0.5, "no data yet", transform=axes.transAxes, ha="center", va="center")
        return
    # Outside the axes so the legend never hides a curve, however many workers there are.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


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


def _run_title(run_dir: Path) -> str:
    """Builds "<model> on <dataset>, <W> workers, <S> shards" from config.json if present."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return run_dir.name
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    model = _config_value(config, ("model", "model_name"))
    dataset = _config_value(config, ("dataset", "dataset_name"))
    num_workers = _config_value(config, ("num_workers", "workers"))
    num_shards = _config_value(config, ("num_shards", "shards"))
    what = " on ".join(str(v) for v in (model, dataset) if v is not None) or run_dir.name
    counts = [
        f"{count} {noun}{'' if count == 1 else 's'}"
        for count, noun in ((num_workers, "worker"), (num_shards, "shard"))
        if count is not None
    ]
    return ", ".join([what, *counts])


def _save_png_atomic(figure: Figure, path: Path) -> None:
    """Saves to a temp file in the same folder, then renames, so readers never see half a PNG."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            figure.savefig(tmp_file, format="png", dpi=DPI)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; a plot is meant to be shared.
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
