"""The launcher's imports with SIGINT, SIGTERM and SIGHUP deferred (see
``distbelief.deferred_signals``): torch's, orjson's and tensorboard's initialisation is C code,
where a signal's exception can crash the interpreter or be lost."""

from __future__ import annotations

import importlib
from types import ModuleType

from distbelief.deferred_signals import signals_deferred


def import_with_signals_deferred(*modules: str) -> ModuleType:
    """Imports ``modules`` in order with SIGINT, SIGTERM and SIGHUP only noted meanwhile, then
    acted on once all are loaded; returns the last. Torch's, orjson's and tensorboard's
    initialisation is C code: SIGTERM there made a process die of SIGSEGV, or was lost."""
    with signals_deferred():
        loaded = [importlib.import_module(module) for module in modules]
    return loaded[-1]
