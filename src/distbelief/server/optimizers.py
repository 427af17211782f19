"""Server-side optimizers: how a shard turns a pushed gradient into a parameter update.

Each shard keeps the optimizer state of its own slice only. The update rules are elementwise,
so applying ``torch.optim`` to a slice gives exactly the unsharded result on that slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

ServerOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

_BUILDERS: dict[str, Callable[..., ServerOptimizerFactory]] = {
    "sgd": lambda lr: lambda params: torch.optim.SGD(params, lr=lr),
}

SERVER_OPTIMIZER_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def server_optimizer_factory(name: str, **hyperparameters: Any) -> ServerOptimizerFactory:
    """A factory that builds the named optimizer over a shard's slice tensors.

    Raises:
        ValueError: unknown name or hyperparameters.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown server optimizer {name!r} (choices: {SERVER_OPTIMIZER_NAMES})")
    try:
        return _BUILDERS[name](**hyperparameters)
    except TypeError as e:
        raise ValueError(f"server optimizer {name!r}: {e}") from e


def apply_update(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> None:
    """One optimizer step of ``params`` with ``grads`` (the grads are used, not copied)."""
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    optimizer.step()
    for param in params:
        param.grad = None
