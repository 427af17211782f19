"""Observability of a run: the metrics record and its CSV, TensorBoard scalars, the progress
display and the shards' counters, each a ``Sink`` (or a source of records for one).

Names load on first use, so importing this package pulls in neither torch (TensorBoard) nor
rich (the dashboard): the launcher pays for them only when it uses them.
"""

from __future__ import annotations

from distbelief.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Sink": "distbelief.telemetry.sink",
    "FanOut": "distbelief.telemetry.sink",
    "METRIC_FIELDS": "distbelief.telemetry.metrics",
    "ROLES": "distbelief.telemetry.metrics",
    "MetricsWriter": "distbelief.telemetry.metrics",
    "make_record": "distbelief.telemetry.metrics",
    "check_metrics_header": "distbelief.telemetry.metrics",
    "has_records": "distbelief.telemetry.metrics",
    "read_metrics": "distbelief.telemetry.metrics",
    "TENSORBOARD_DIR": "distbelief.telemetry.tensorboard",
    "TensorBoardLog": "distbelief.telemetry.tensorboard",
    "scalar_tags": "distbelief.telemetry.tensorboard",
    "ProgressDisplay": "distbelief.telemetry.progress",
    "ShardStatsPoller": "distbelief.telemetry.shard_stats",
    "poll_shard_stats": "distbelief.telemetry.shard_stats",
    "shard_records": "distbelief.telemetry.shard_stats",
    "roc_auc": "distbelief.telemetry.auc",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
