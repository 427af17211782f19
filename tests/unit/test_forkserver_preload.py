"""What a job's forkserver (or a Ray node's zygote) loads before it forks: ``torch._dynamo``
only for a job whose processes build a torch.optim optimizer (shards of a server optimizer
that keeps state); the default Downpour job and Sandblaster jobs build none."""

from __future__ import annotations

import pytest

from distbelief.config import JobConfig
from distbelief.launch.entry import ROLE_MODULES, preloaded_modules
from distbelief.launch.local import _preload


def test_a_downpour_job_of_plain_sgd_shards_loads_the_roles_without_dynamo() -> None:
    modules = _preload(JobConfig())
    assert modules[0] == "__main__"
    assert "torch._dynamo" not in modules
    assert {"torch", "distbelief.launch.entry", *ROLE_MODULES} <= set(modules)


@pytest.mark.parametrize("server_optimizer", ["momentum", "adagrad", "adam"])
def test_shards_of_a_stateful_server_optimizer_have_dynamo_loaded_once(server_optimizer) -> None:
    config = JobConfig.from_fields({"server.optimizer": server_optimizer})
    assert preloaded_modules(config)[:2] == ["torch", "torch._dynamo"]
    assert "torch._dynamo" in _preload(config)


def test_a_sandblaster_job_loads_the_roles_without_dynamo() -> None:
    config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster"})
    modules = _preload(config)
    assert "torch._dynamo" not in modules
    assert {"torch", "distbelief.launch.entry", "distbelief.worker"} <= set(modules)
