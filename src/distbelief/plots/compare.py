"""PNG plots that compare several run folders: one figure per metric, one line per run, each
labelled from its ``config.json`` (e.g. "4w x 2s, adagrad, n_push=1").

Reads run folders through ``distbelief.plots.run`` and writes PNGs only into the folder it is
given; it never changes a run folder it reads.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from distbelief.config import algorithm_of_field
from distbelief.plots.run import (
    FIGURE_SIZE_IN,
    RunData,
    Series,
    batch_size_of,
    load_run,
    lone_point_marker,
    new_figure,
    save_pngs_atomic,
    series_by_rank,
    style_axes,
    tests_own_replica,
    time_bin_s,
    total_rate,
)

logger = logging.getLogger(__name__)

LEGEND_ROW_IN = 0.25
"""Extra figure height per line of the legend below the axes."""
LEGEND_LINE_CHARS = 110
"""Longer labels are wrapped: one line wider than the figure made its layout shrink the axes to
a sliver, or give up and cut the legend off."""

PARTITIONS_FIELD = "pipeline.num_partitions"
_LABEL_KEYS = {
    "model.name": "model",
    "data.name": "dataset",
    "data.table_size": "table_size",
    "model.embedding_dim": "embedding_dim",
    "optimizer.n_pull": "n_pull",
    "optimizer.lr": "lr",
    "optimizer.steps": "steps",
    "optimizer.epochs": "epochs",
    "optimizer.blocking": "blocking",
    "server.lr": "server_lr",
    "server.momentum": "server_momentum",
    "server.betas": "server_betas",
    "server.eps": "server_eps",
    "optimizer.batch_size": "batch_size",
    "consistency.sync": "sync",
    "consistency.backup_workers": "backup_workers",
    "consistency.max_staleness": "max_staleness",
    "consistency.staleness_policy": "staleness_policy",
    "consistency.dc_lambda": "dc_lambda",
    "consistency.liveness_timeout_s": "liveness_timeout_s",
    "consistency.apply_worker_lr": "apply_worker_lr",
    "embeddings.tables": "tables",
    "embeddings.row_optimizer": "row_optimizer",
    "embeddings.row_lr": "row_lr",
    "embeddings.admit_after": "admit_after",
    "embeddings.max_rows_per_shard": "max_rows_per_shard",
    "embeddings.row_ttl_steps": "row_ttl_steps",
    "embeddings.row_init_std": "row_init_std",
    "embeddings.row_cache_mb": "row_cache_mb",
    "sandblaster.history": "history",
    "sandblaster.backup_tasks": "backup_tasks",
    "optimizer.warmstart_steps": "warmstart_steps",
    PARTITIONS_FIELD: "partitions",
    "pipeline.num_micro_batches": "micro_batches",
    "pipeline.schedule": "schedule",
    "pipeline.split_points": "split_points",
    "sandblaster.line_search": "line_search",
    "sandblaster.step_size": "step_size",
    "sandblaster.portions": "portions",
    "sandblaster.portions_per_push": "portions_per_push",
    "sandblaster.max_iterations": "max_iterations",
    "sandblaster.max_evaluations": "max_evaluations",
    "optimizer.wire_dtype": "wire_dtype",
    "optimizer.push_compression": "push_compression",
    "cluster.device": "device",
    # How the shards serve and how often they save: the throughput's settings.
    "cluster.transport": "transport",
    "server.design": "server_design",
    "server.checkpoint_every_s": "checkpoint_every_s",
    "reporting.eval_every_s": "eval_every_s",
    "reporting.eval_during_training": "eval_during_training",
    "model.seed": "seed",
}
"""Config fields added to a run's label when they differ between the compared runs -> the
name the label shows."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _CompareSpec:
    file_name: str
    y_label: str
    series: Callable[[RunData], Series]
    markers: bool = False
    """Mark each point (evaluations are few; a run without live evaluation has one)."""
    tested: bool = False
    """A test metric: of the PS's parameters, or of a worker's own replica (the example's
    nodes test theirs), which the axis title says."""


def _evaluator_series(field: str) -> Callable[[RunData], Series]:
    def series(run: RunData) -> Series:
        # One evaluator per run: a job's is rank 0, an example node's has the node's worker
        # rank (node2's is 1).
        by_rank = series_by_rank(run.records, "evaluator", field)
        return next(iter(by_rank.values()), ([], []))

    return series


def _y_label(spec: _CompareSpec, runs: Sequence[RunData]) -> str:
    """The axis title: a test metric names whose model it measured, the PS's or the
    workers' own replicas (an example node's curve is its own replica's); the training loss,
    whose (a Sandblaster run's is its coordinator's batch loss: its workers report none)."""
    if spec.series is _mean_train_loss:
        sandblaster = {_is_sandblaster(run.config) for run in runs}
        if sandblaster == {True}:
            return "training loss, the coordinator's batch loss"
        if sandblaster == {True, False}:
            # Two lines: as one, it ran past the axes' height, off the figure.
            return "training loss, mean of workers\n(Sandblaster: the coordinator's batch loss)"
    if not spec.tested:
        return spec.y_label
    own_replicas = {tests_own_replica(run.config) for run in runs}
    if own_replicas == {True}:
        return f"test {spec.y_label}, each worker's own replica"
    if own_replicas == {False}:
        return f"PS test {spec.y_label}"
    return f"test {spec.y_label} (PS, or a worker's own replica)"


def _is_sandblaster(config: dict[str, Any]) -> bool:
    return config.get("optimizer.algorithm", "downpour") == "sandblaster"


def _mean_train_loss(run: RunData) -> Series:
    """The workers' training loss, averaged per time bin (workers report at different times);
    a Sandblaster run's is its coordinator's batch loss (its workers report no loss)."""
    role = "coordinator" if _is_sandblaster(run.config) else "worker"
    bin_s = time_bin_s(run.records)
    sums: dict[int, list[float]] = {}
    for record in run.records:
        if record["role"] == role and record["loss"] is not None:
            total_count = sums.setdefault(int(record["time_s"] // bin_s), [0.0, 0.0])
            total_count[0] += record["loss"]
            total_count[1] += 1
    bins = sorted(sums)
    return [(b + 0.5) * bin_s for b in bins], [sums[b][0] / sums[b][1] for b in bins]


def _throughput(run: RunData) -> Series:
    """Samples/s of all workers; none for a run whose steps are not batches of a known size
    (a Sandblaster worker's step is an L-BFGS iteration), rather than its steps/s on an axis
    of samples/s."""
    batch_size = batch_size_of(run.config)
    if batch_size is None:
        return [], []
    times_s, rates = total_rate(run.records)
    return times_s, [rate * batch_size for rate in rates]


_COMPARISONS = (
    _CompareSpec(
        file_name="compare_test_accuracy_vs_time.png",
        y_label="accuracy",
        series=_evaluator_series("test_accuracy"),
        markers=True,
        tested=True,
    ),
    _CompareSpec(
        file_name="compare_test_loss_vs_time.png",
        y_label="loss (cross-entropy)",
        series=_evaluator_series("test_loss"),
        markers=True,
        tested=True,
    ),
    _CompareSpec(
        file_name="compare_train_loss_vs_time.png",
        y_label="training loss, mean of workers",
        series=_mean_train_loss,
    ),
    _CompareSpec(
        file_name="compare_throughput_vs_time.png",
        y_label="throughput, all workers (samples/s)",
        series=_throughput,
    ),
)


def plot_runs(run_dirs: Sequence[Path | str], *, out_dir: Path | str) -> list[Path]:
    """Compares runs: test accuracy and test loss (of the PS's parameters; of a worker's own
    replica for an example node), workers' training loss and throughput vs time, one PNG per
    metric with one line per run.

    Args:
        run_dirs: two or more run folders, each holding ``metrics.csv``.
        out_dir: where the PNGs go (created if missing).

    Returns:
        The paths of the PNG files written.

    Raises:
        TypeError: ``run_dirs`` is one path, not a list.
        ValueError: fewer than two folders, a folder that is not a run, or a malformed
            ``metrics.csv`` or ``config.json`` (the message names it).
    """
    if isinstance(run_dirs, (str, Path)):
        raise TypeError(f"run_dirs must be a list of two or more run folders, got {run_dirs!r}")
    if len(run_dirs) < 2:
        raise ValueError(f"plot_runs compares two or more run folders, got {len(run_dirs)}")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    labels = run_labels(runs)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    # A figure no run has data for (throughput, of Sandblaster runs alone) would say only
    # "no data yet": it is not drawn.
    drawn = [spec for spec in _COMPARISONS if any(spec.series(run)[0] for run in runs)]
    for spec in _COMPARISONS:
        if spec not in drawn:
            logger.info("%s not drawn: no run has data for it", spec.file_name)
    figures = {out_path / spec.file_name: _make_comparison(runs, labels, spec) for spec in drawn}
    save_pngs_atomic(figures)
    written = list(figures)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def _make_comparison(runs: list[RunData], labels: list[str], spec: _CompareSpec) -> Figure:
    # Labels can be long: the legend goes below the axes, and the figure grows to hold it.
    labels = [_wrap_label(label, spec, run) for run, label in zip(runs, labels, strict=True)]
    legend_lines = sum(label.count("\n") + 1 for label in labels)
    figure, axes = new_figure(height_in=FIGURE_SIZE_IN[1] + LEGEND_ROW_IN * legend_lines)
    has_data = False
    for run, label in zip(runs, labels, strict=True):
        times_s, values = spec.series(run)
        axes.plot(
            times_s,
            values,
            linewidth=1.8,
            marker="o" if spec.markers else lone_point_marker(times_s),
            markersize=3.5,
            label=label,
        )
        has_data = has_data or bool(times_s)
    style_axes(axes, _y_label(spec, runs), _title(runs), has_data=has_data)
    if has_data:
        axes.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), fontsize="small", frameon=False)
    if "throughput" in spec.y_label:
        axes.set_ylim(bottom=0.0)
    figure.tight_layout()
    return figure


def _wrap_label(label: str, spec: _CompareSpec, run: RunData) -> str:
    """A run's legend label, marked when it has no data for this figure, in lines that fit."""
    if not spec.series(run)[0]:
        label += " (no data)"
    return textwrap.fill(label, LEGEND_LINE_CHARS, break_long_words=False)


def _title(runs: Sequence[RunData]) -> str:
    """ "<model> on <dataset>: N runs" when every run trained the same, else "N runs"."""
    what = {(run.config.get("model.name"), run.config.get("data.name")) for run in runs}
    (model, dataset), *others = what
    if others or model is None or dataset is None:
        return f"{len(runs)} runs"
    return f"{model} on {dataset}: {len(runs)} runs"


def _label_part(key: str, value: object) -> str:
    if key == "eval_during_training":
        return "live eval" if value else "no live eval"
    if key == "sync":
        return "sync" if value else "async"
    return f"{key}={value}"


def _base_label(config: dict[str, Any]) -> str:
    workers = config.get("cluster.num_workers", "?")
    shards = config.get("cluster.num_shards", "?")
    parts = [f"{workers}w x {shards}s"]
    if _is_sandblaster(config):
        # Its shards run no server optimizer and its workers push no Downpour steps.
        parts.append(f"sandblaster L-BFGS, history={config.get('sandblaster.history', '?')}")
        return ", ".join(parts)
    if "server.optimizer" in config:
        parts.append(str(config["server.optimizer"]))
    if "optimizer.n_push" in config:
        parts.append(f"n_push={config['optimizer.n_push']}")
    return ", ".join(parts)


_DOES_NOT_APPLY = object()
"""A run's value of a setting its algorithm does not use, or that its config.json does not
record (a run folder without one, or one written by a script with a few fields): neither shown
in its label nor a difference from the runs that have it. Counted as a difference, every field
a run lacks put all the others' values into their labels, too long for the figure."""


def _label_value(config: dict, key: str) -> object:
    """A run's value of ``key`` as a label shows it: a Downpour run given no batch size ran
    batches of the default size, the same as one given that size; a Sandblaster run has no
    value of a Downpour setting (it is not async, say, only not sync); a run that records no
    partitions trained a whole model."""
    if _is_sandblaster(config) and algorithm_of_field(key) == "downpour":
        return _DOES_NOT_APPLY
    if config and not _is_sandblaster(config) and algorithm_of_field(key) == "sandblaster":
        return _DOES_NOT_APPLY  # a Downpour run has no line search, say
    if key == "optimizer.batch_size" and config and not _is_sandblaster(config):
        return batch_size_of(config)
    if key == PARTITIONS_FIELD and config:
        # A config.json without it (the example's nodes', a run's from before partitions)
        # is of a whole model: one partition, which a partitioned run's label differs from.
        return config.get(key, 1)
    return config.get(key, _DOES_NOT_APPLY)


def run_labels(runs: Sequence[RunData]) -> list[str]:
    """One legend label per run: "<W>w x <S>s, <server optimizer>, n_push=<n>", plus the
    config fields that differ between the runs, plus the folder name where labels still
    collide. A run without ``config.json`` is labelled with its folder name."""
    labels = [_base_label(run.config) if run.config else run.run_dir.name for run in runs]
    for key, shown in _LABEL_KEYS.items():
        values = [_label_value(run.config, key) for run in runs]
        if len({repr(value) for value in values if value is not _DOES_NOT_APPLY}) > 1:
            labels = [
                f"{label}, {_label_part(shown, value)}"
                if value is not None and value is not _DOES_NOT_APPLY
                else label
                for label, value in zip(labels, values, strict=True)
            ]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({run.run_dir.name})" for label, run in zip(labels, runs, strict=True)]
    return labels
