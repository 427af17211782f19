"""PSEvaluator: the shards' current parameters pulled into a local model and measured on the
test set. It only reads from the shards, never pushes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from distbelief.client import ParameterServerClient
from distbelief.data import load_job_dataset
from distbelief.evaluator.accuracy import evaluate
from distbelief.pipeline.job import parameter_groups
from distbelief.sharding import FlatLayout, tensor_specs
from distbelief.telemetry.metrics import PARTITION_VERSIONS
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
        self._readers: list[GroupReader] = []
        shape, classes = self.test_set.input_shape, self.test_set.num_classes
        try:
            for group, named in parameter_groups(config, self.model, shape, classes):
                self._readers.append(GroupReader(config, addresses, named, group, security))
        except BaseException:
            self.close()
            raise

    @torch.no_grad()
    def evaluate(self, cut_short: Callable[[], bool] | None = None) -> dict:
        """Test loss, accuracy and the shards' version of one fresh pull (the lowest shard
        version: the updates every shard has had). A model-parallel model's partitions each
        have a version of their own (the pushes of its stages): ``version`` is the lowest,
        the updates every partition has had, and ``PARTITION_VERSIONS`` lists them in stage
        order. ``cut_short`` is for the evaluators' common call: one pass over the test set
        is not cut.

        Raises:
            ShardTimeoutError: a shard did not answer the pull within the request timeout, or
                (its versions unchanged since the last evaluation) a request at all.
            ShardUnavailableError: a shard cannot be reached.
        """
        versions = [reader.pull() for reader in self._readers]
        for reader in self._readers:
            reader.check_answering_if_unchanged()
        test_loss, test_accuracy = evaluate(self.model, self.test_set)
        result = {"test_loss": test_loss, "test_accuracy": test_accuracy, "version": min(versions)}
        if len(versions) > 1:
            result[PARTITION_VERSIONS] = versions
        return result

    def close(self) -> None:
        """Closes the connections to the shards, at once: a reader sends nothing that must
        get through, and a request still retrying a shard that is down stops."""
        for reader in self._readers:
            reader.client.close(wait=False)


class GroupReader:
    """One parameter group's pull into the model's parameters."""

    def __init__(self, config, addresses, named, group: str, security) -> None:
        self.layout = FlatLayout(tensor_specs(named))
        self._flats = self.layout.allocate()
        self._views = self.layout.views(self._flats)
        self._params = [p for _, p in named]
        self.client = ParameterServerClient(
            addresses,
            self.layout.specs,
            timeout_s=config.faults.timeout_s,
            retry_timeout_s=config.faults.retry_timeout_s,
            security=security,
            group=group,
        )
        try:
            self.client.handshake(None)
        except BaseException:
            # At once: the other shards' hellos still retrying would hold up a Ctrl-C for the
            # whole retry timeout.
            self.client.close(wait=False)
            raise
        self._versions: list[int] = []
        self._last_versions: list[int] = []

    def pull(self) -> int:
        """Pull into the parameters; returns the lowest shard version: the updates every part
        of the parameters has had. (The highest named a shard restarted with none of them,
        its checkpoint's, as holding every update the others had.)"""
        self._last_versions, self._versions = self._versions, self.client.pull_now(self._flats)
        torch._foreach_copy_(self._params, self._views)
        return min(self._versions)

    def check_answering_if_unchanged(self) -> None:
        """After a pull that found every shard where the one before did, ask the shards for
        their counters: a pull over shared memory reads a shard's parameters without asking
        it, so only a request tells a shard that went quiet (a finished job's) from one that
        hung or was stopped.

        Raises:
            ShardTimeoutError: a shard did not answer within the request timeout.
            ShardUnavailableError: a shard cannot be reached.
        """
        if self._versions == self._last_versions:
            self.client.stats()
