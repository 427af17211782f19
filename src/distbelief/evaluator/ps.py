"""PSEvaluator: the shards' current parameters pulled into a local model and measured on the
test set. It only reads from the shards, never pushes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from distbelief.client import ParameterServerClient
from distbelief.data import load_job_dataset
from distbelief.evaluator.accuracy import evaluate
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.worker.replica import build_replica

if TYPE_CHECKING:
    from distbelief.config import JobConfig
    from distbelief.wire.security import WireSecurity


class PSEvaluator:
    """Pulls the shards' parameters into a local model and measures it on the test set.

    Args:
        config: the job's config; only model, dataset, data_dir, download and seed (they fix
            the parameter layout, which must match the shards'), timeout_s and retry_timeout_s
            matter.
        addresses: one address per shard, in shard-id order.
        security: the job's authentication key and TLS settings (None: none).

    Raises:
        ShardTimeoutError: no worker initialised the shards within ``config.faults.timeout_s``.
        ShardUnavailableError: a shard cannot be reached.
        ModelMismatchError: the shards hold another model's parameters.
    """

    def __init__(
        self,
        config: JobConfig,
        addresses: Sequence[str],
        *,
        security: WireSecurity | None = None,
    ) -> None:
        self.test_set = load_job_dataset(config.data, "test")
        self.model = build_replica(config, self.test_set.input_shape, self.test_set.num_classes)
        self.layout = FlatLayout(tensor_specs(self.model.named_parameters()))
        self._flats = self.layout.allocate()
        self._views = self.layout.views(self._flats)
        self._params = list(self.model.parameters())
        self.client = ParameterServerClient(
            addresses,
            self.layout.specs,
            timeout_s=config.faults.timeout_s,
            retry_timeout_s=config.faults.retry_timeout_s,
            security=security,
        )
        try:
            self.client.handshake(None)
        except BaseException:
            self.client.close()
            raise

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test loss, accuracy and the shards' highest version of one fresh pull.

        Raises:
            ShardTimeoutError: a shard did not answer the pull within the request timeout.
            ShardUnavailableError: a shard cannot be reached.
        """
        versions = self.client.pull_now(self._flats)
        torch._foreach_copy_(self._params, self._views)
        test_loss, test_accuracy = evaluate(self.model, self.test_set)
        return {"test_loss": test_loss, "test_accuracy": test_accuracy, "version": max(versions)}

    def close(self) -> None:
        self.client.close()
