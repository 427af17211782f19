"""CtrEvaluator: a click model measured on the parameter server's parameters: the dense layers
pulled whole, the tables' rows pulled for each test batch's ids. Test loss (binary
cross-entropy), accuracy at 0.5 and the click AUC. It only reads from the shards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from distbelief.data import load_job_dataset
from distbelief.evaluator.ps import GroupReader
from distbelief.telemetry.auc import roc_auc
from distbelief.worker.ctr import (
    build_ctr_replica,
    check_dense_parameters,
    job_tables,
    table_columns,
)

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity

EVAL_BATCH_SIZE = 4096
"""Most test samples per forward pass (and per row pull)."""

EVAL_BATCH_ROW_BYTES = 256 << 20
"""Most bytes of rows one forward pass looks up: 4096 samples of 26 rows of 16 floats are
7 MB, but of 65536 floats 28 GB (a pass then takes 39 samples)."""


def samples_per_pass(row_widths: Sequence[int]) -> int:
    """Test samples per forward pass of a model that looks up one row of each of tables
    ``row_widths`` wide (float32) per sample: EVAL_BATCH_SIZE, or fewer where their rows would
    pass EVAL_BATCH_ROW_BYTES."""
    row_bytes = 4 * max(1, sum(row_widths))
    return max(1, min(EVAL_BATCH_SIZE, EVAL_BATCH_ROW_BYTES // row_bytes))


class CtrEvaluator:
    """Pulls the shards' dense parameters and the rows each test batch needs, and measures the
    model on the test split.

    Raises:
        ShardTimeoutError: no worker initialised the shards within the request timeout.
        ShardUnavailableError: a shard cannot be reached.
        ModelMismatchError: the shards hold another model's parameters or tables.
    """

    def __init__(
        self,
        config: JobConfig,
        addresses: Sequence[str],
        *,
        security: WireSecurity | None = None,
    ) -> None:
        self.test_set = load_job_dataset(config.data, "test")
        self.model = build_ctr_replica(config, self.test_set)
        check_dense_parameters(config, self.model, addresses, security)
        self.tables = job_tables(config, self.model, addresses, security, cache=False)
        try:
            named = list(self.model.named_parameters())
            self._dense = GroupReader(config, addresses, named, "", security)
        except BaseException:
            self.tables.client.close(wait=False)
            raise
        self._columns = table_columns(self.tables)
        self._batch_size = samples_per_pass(
            [table.embedding_dim for table in self.tables.modules.values()]
        )

    @torch.no_grad()
    def evaluate(self, cut_short: Callable[[], bool] | None = None) -> dict | None:
        """Test loss, accuracy, AUC and the shards' (dense) version of one fresh pull; None
        if ``cut_short`` says so between two forward passes (the job stopped: these
        parameters are no longer its last)."""
        version = self._dense.pull()
        logits = []
        for start in range(0, len(self.test_set), self._batch_size):
            if cut_short is not None and cut_short():
                return None
            dense = self.test_set.dense[start : start + self._batch_size]
            sparse = self.test_set.sparse[start : start + self._batch_size]
            self.tables.prefetch({name: sparse[:, c] for name, c in self._columns.items()})
            logits.append(self.model(dense, sparse))
            self.tables.forget_batch()
        scores = torch.cat(logits)
        labels = self.test_set.labels
        try:
            auc = roc_auc(scores, labels)
        except ValueError:
            auc = None
        return {
            "test_loss": float(F.binary_cross_entropy_with_logits(scores, labels)),
            "test_accuracy": float(((scores > 0).float() == labels).float().mean()),
            "test_auc": auc,
            "version": version,
        }

    def close(self) -> None:
        self._dense.client.close()
        self.tables.client.close()
