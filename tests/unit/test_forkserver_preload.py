"""What a local job's forkserver loads before it forks: ``torch._dynamo`` only for a job whose
processes build a torch.optim optimizer (Downpour's workers); a Sandblaster job's build none."""

from __future__ import annotations

from distbelief.config import JobConfig
from distbelief.launch.local import _preload


def test_a_downpour_job_loads_dynamo_once_for_its_workers() -> None:
    modules = _preload(JobConfig())
    assert modules[:3] == ["__main__", "torch", "torch._dynamo"]
    assert "distbelief.worker" in modules


def test_a_sandblaster_job_loads_the_roles_without_dynamo() -> None:
    config = JobConfig.from_fields({"optimizer.algorithm": "sandblaster"})
    modules = _preload(config)
    assert "torch._dynamo" not in modules
    assert {"torch", "distbelief.launch.entry", "distbelief.worker"} <= set(modules)
