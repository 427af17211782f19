"""The package's public API: every name in ``distbelief.__all__`` resolves, the version is the
installed one, and importing the package alone does not import torch (fast ``--help``)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import distbelief


def test_version_is_the_installed_distribution_version():
    assert distbelief.__version__ == importlib.metadata.version("distbelief")


@pytest.mark.parametrize("name", [n for n in distbelief.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    assert getattr(distbelief, name) is not None
    assert name in dir(distbelief)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        distbelief.no_such_thing  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    code = "import sys, distbelief; print('torch' in sys.modules)"
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
