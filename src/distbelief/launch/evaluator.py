"""The evaluator role: pulls the parameter server's parameters into a local model and measures
test loss and accuracy, periodically and once more at the end of a job."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from distbelief.client import ParameterServerClient
from distbelief.data import load_dataset
from distbelief.launch.config import TrainConfig
from distbelief.launch.roles import Emit, StopFlag, build_replica, evaluate
from distbelief.metrics import make_record
from distbelief.sharding import FlatLayout, tensor_specs


class PSEvaluator:
    """Pulls the shards' parameters into a local model and measures it on the test set."""

    def __init__(self, config: TrainConfig, addresses: Sequence[str]) -> None:
        self.test_set = load_dataset(
            config.dataset, split="test", data_dir=config.data_dir, download=config.download
        )
        self.model = build_replica(config, self.test_set.input_shape, self.test_set.num_classes)
        params = list(self.model.parameters())
        self.layout = FlatLayout(tensor_specs(self.model.named_parameters()))
        self._flats = self.layout.allocate()
        self._views = self.layout.views(self._flats)
        self._params = params
        self.client = ParameterServerClient(
            addresses, self.layout.specs, timeout_s=config.timeout_s
        )
        self.client.handshake(None)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test loss, accuracy and the shards' summed version of one fresh pull."""
        versions = self.client.wait(self.client.pull(self._flats))
        torch._foreach_copy_(self._params, self._views)
        test_loss, test_accuracy = evaluate(self.model, self.test_set)
        return {"test_loss": test_loss, "test_accuracy": test_accuracy, "version": max(versions)}

    def close(self) -> None:
        self.client.close()


def run_evaluator(
    config: TrainConfig,
    addresses: Sequence[str],
    *,
    emit: Emit,
    start_time: float,
    stop: StopFlag,
) -> dict:
    """Evaluate the shards' parameters now, every ``eval_every_s`` until ``stop``, then once
    more; a parameter version already evaluated is not reported twice."""
    torch.set_num_threads(1)
    evaluator = PSEvaluator(config, addresses)
    last_version = -1
    try:
        while True:
            result = evaluator.evaluate()
            if result["version"] != last_version:
                emit(
                    "metric", make_record("evaluator", 0, time_s=time.time() - start_time, **result)
                )
                last_version = result["version"]
            if stop.is_set():
                return result
            stop.wait(config.eval_every_s)
    finally:
        evaluator.close()
