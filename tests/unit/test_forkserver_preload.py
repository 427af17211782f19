"""What a job's forkserver (or a Ray node's zygote) loads before it forks: torch and the roles,
never ``torch._dynamo``, which no process of a job needs (its shards' optimizers and the
workers' DownpourSGD run torch's methods without the guards that import it)."""

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
def test_shards_of_a_stateful_server_optimizer_load_no_dynamo_either(server_optimizer) -> None:
    config = JobConfig.from_fields({"server.optimizer": server_optimizer})
    assert preloaded_modules(config) == ["torch", *ROLE_MODULES]
    assert "torch._dynamo" not in _preload(config)


def test_a_sandblaster_job_loads_the_roles_without_dynamo() -> None:
    config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster"})
    modules = _preload(config)
    assert "torch._dynamo" not in modules
    assert {"torch", "distbelief.launch.entry", "distbelief.worker"} <= set(modules)
