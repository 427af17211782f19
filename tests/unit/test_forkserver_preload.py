"""What a job's forkserver (or a Ray node's zygote) loads before it forks: torch and the roles,
never ``torch._dynamo``, which no process of a job needs (its shards' optimizers and the
workers' DownpourSGD run torch's methods without the guards that import it)."""

from __future__ import annotations

from distbelief.launch.entry import PRELOADED_MODULES, ROLE_MODULES
from distbelief.launch.local import FORKSERVER_PRELOAD


def test_the_forkserver_loads_torch_and_the_roles_and_never_dynamo() -> None:
    assert FORKSERVER_PRELOAD[0] == "__main__"
    assert ("torch", *ROLE_MODULES) == PRELOADED_MODULES
    assert {"distbelief.launch.entry", *PRELOADED_MODULES} <= set(FORKSERVER_PRELOAD)
    assert "torch._dynamo" not in FORKSERVER_PRELOAD
