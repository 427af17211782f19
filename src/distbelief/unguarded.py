"""torch.optim.Optimizer's own methods without the guard torch puts around them for its
compiler, while nothing in the process compiles.

torch wraps ``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` in
``torch._disable_dynamo``, and every built-in optimizer's ``step`` in a wrapper that imports
``torch._dynamo``: the first call of each imports it (about as much CPU again as ``import
torch``) so that code being compiled does not trace into them. Nothing can be compiling while
``torch._dynamo`` is not loaded, and the method as written does the same work: an optimizer
made here, in a process that never compiles, does without the import. Once ``torch._dynamo``
is loaded (the user compiles something), the guarded method runs, as always.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch


def _compiler_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def call_unguarded(name: str, optimizer: torch.optim.Optimizer, *args, **kwargs):
    """``torch.optim.Optimizer.<name>(optimizer, *args, **kwargs)``, unguarded while
    ``torch._dynamo`` is not loaded."""
    guarded = getattr(torch.optim.Optimizer, name)
    method = guarded if _compiler_loaded() else getattr(guarded, "__wrapped__", guarded)
    return method(optimizer, *args, **kwargs)


def step_unguarded(
    step: Callable, optimizer: torch.optim.Optimizer, closure: Callable | None = None
):
    """``step(optimizer, closure)``, a built-in optimizer's ``step`` as its class has it,
    unguarded while ``torch._dynamo`` is not loaded: the step as written, under the grad mode
    its guard sets (enabled only for a ``differentiable`` optimizer)."""
    if _compiler_loaded():
        return step(optimizer, closure)
    with torch.set_grad_enabled(optimizer.defaults["differentiable"]):
        return inspect.unwrap(step)(optimizer, closure)
