"""torch.optim.Optimizer's own methods without the guard torch puts around them for its
compiler, while nothing in the process compiles.

torch wraps ``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` in
``torch._disable_dynamo``: the first call of each imports ``torch._dynamo`` (about as much CPU
again as ``import torch``) so that code being compiled does not trace into them. Nothing can be
compiling while ``torch._dynamo`` is not loaded, and the method as written does the same work:
an optimizer made here, in a process that never compiles, does without the import. Once
``torch._dynamo`` is loaded (the user compiles something), the guarded method runs, as always.
"""

from __future__ import annotations

import sys

import torch


def call_unguarded(name: str, optimizer: torch.optim.Optimizer, *args, **kwargs):
    """``torch.optim.Optimizer.<name>(optimizer, *args, **kwargs)``, unguarded while
    ``torch._dynamo`` is not loaded."""
    guarded = getattr(torch.optim.Optimizer, name)
    method = guarded if "torch._dynamo" in sys.modules else getattr(guarded, "__wrapped__", guarded)
    return method(optimizer, *args, **kwargs)
