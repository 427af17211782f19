"""The launcher's packages load their heavy dependencies only when used: importing them (what
``distbelief --help`` and the launcher's start do, before the processes start) pulls in none of
torch, matplotlib, TensorBoard, rich or Ray (an optional extra); and every name they export
resolves. (While a job runs, the launcher polls its shards and writes TensorBoard events
without torch either: tests/integration/test_shard_stats.py.)"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

PACKAGES = (
    "distbelief.launch",
    "distbelief.telemetry",
    "distbelief.plots",
    "distbelief.wire",
    "distbelief.server",
)
HEAVY = ("torch", "matplotlib", "tensorboard", "rich", "ray")
LAUNCHER_MODULES = ("distbelief.launch.cli", "distbelief.launch.resume", "distbelief.launch.job")
"""What ``distbelief train`` imports before it starts the processes."""


def test_importing_the_launcher_packages_imports_nothing_heavy() -> None:
    code = (
        f"import sys; import {', '.join(PACKAGES)}, {', '.join(LAUNCHER_MODULES)}; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.parametrize(
    ("package", "name"),
    [(p, n) for p in PACKAGES for n in importlib.import_module(p).__all__],
)
def test_every_exported_name_resolves(package: str, name: str) -> None:
    module = importlib.import_module(package)
    assert getattr(module, name) is not None
    assert name in dir(module)


@pytest.mark.parametrize("package", [*PACKAGES, "distbelief"])
def test_no_exported_name_is_also_a_module_of_its_package(package: str) -> None:
    """Importing a package's submodule binds its name on the package: an export of the same
    name (``distbelief.launch.train``, the function, once lived in ``launch/train.py``) would
    then be the module or the function depending on what some other code imported first."""
    module = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    assert not submodules & set(module.__all__)
