"""The examples are what a user writes: they import only the public API (``distbelief``'s
``__all__`` and its documented subpackages'), and the limits and choices they keep themselves
are the library's."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from distbelief import config
from distbelief.data.synthetic_ctr import DEFAULT_NUM_SAMPLES
from tests.conftest import load_script

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.py"))
PUBLIC_MODULES = (
    "distbelief",
    "distbelief.optim",
    "distbelief.server",
    "distbelief.data",
    "distbelief.models",
    "distbelief.telemetry",
    "distbelief.launch",
)


def _distbelief_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of each import of distbelief in ``path`` (name None: the module itself)."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return [(module, name) for module, name in found if module.split(".")[0] == "distbelief"]


def _private_imports(path: Path) -> list[str]:
    private = []
    for module, name in _distbelief_imports(path):
        if module not in PUBLIC_MODULES:
            private.append(f"{module}" if name is None else f"{module}.{name}")
        elif name is not None and name not in importlib.import_module(module).__all__:
            private.append(f"{module}.{name} (not in its __all__)")
    return private


def test_there_are_examples_and_they_import_distbelief():
    assert {path.name for path in EXAMPLES} >= {"main.py", "recommendation.py"}
    assert all(_distbelief_imports(path) for path in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_an_example_imports_only_public_names(path):
    assert _private_imports(path) == []


def test_a_name_outside_the_public_api_is_caught(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import distbelief.wire\n"
        "from distbelief import DownpourSGD\n"
        "from distbelief.config import MAX_RATE\n"
        "from distbelief.data import make_synthetic\n"
    )
    assert _private_imports(script) == [
        "distbelief.wire",
        "distbelief.config.MAX_RATE",
        "distbelief.data.make_synthetic (not in its __all__)",
    ]


def test_the_limits_and_choices_the_examples_keep_are_the_librarys():
    main = load_script(EXAMPLES[0].with_name("main.py"))
    recommendation = load_script(EXAMPLES[0].with_name("recommendation.py"))
    image_models = [name for name in config.MODEL_NAMES if name not in config.CLICK_MODELS]
    click_logs = config.CLICK_LOG_DATASETS
    assert list(main.IMAGE_MODELS) == image_models
    assert list(main.IMAGE_DATASETS) == [n for n in config.DATASET_NAMES if n not in click_logs]
    assert main.MAX_THREADS == config.MAX_THREADS
    assert main.MAX_RATE == recommendation.MAX_RATE == config.MAX_RATE
    assert recommendation.MAX_CACHE_MB == config.MAX_CACHE_MB
    assert recommendation.MAX_TABLE_SIZE == config.MAX_SYNTHETIC_TABLE_SIZE
    train_samples = DEFAULT_NUM_SAMPLES["train"]
    assert train_samples == recommendation.TRAIN_SAMPLES
