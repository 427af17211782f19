"""The make targets the seed's README tells a user to run (``make setup``, ``make install``,
then ``make first``, ``make second`` and ``make server``) are all in the Makefile, as are the
ones this README names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED_TARGETS = ("setup", "install", "first", "second", "server")
README_TARGETS = ("train", "test", "lint", "format", "bench", "gpu-check")


def _targets() -> set[str]:
    """The Makefile's rule names (a rule: ``name:`` at the start of a line)."""
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, re.M))


@pytest.mark.parametrize("target", SEED_TARGETS + README_TARGETS)
def test_a_target_the_readmes_name_is_a_rule(target):
    assert target in _targets()
