"""Server-side optimizers: how a shard turns a pushed gradient into a parameter update.

Each shard keeps the optimizer state of its own slice only. SGD, momentum, Adagrad (the paper's
choice: per-parameter rate gamma / sqrt(sum of squared gradients)) and Adam are all elementwise,
so ``torch.optim`` applied to a slice gives exactly the unsharded result on that slice. Plain SGD,
the default, is ``PlainSGD``: the same update without building a ``torch.optim`` optimizer (see
there why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distbelief.config import (
    MAX_RATE,
    SERVER_OPTIMIZER_NAMES,
    ServerConfig,
    amount_problem,
    is_amount,
)
from distbelief.unguarded import call_unguarded, step_unguarded


class PlainSGD:
    """``w -= lr * g`` over a shard's slices: the update ``torch.optim.SGD`` makes without
    momentum, weight decay or maximize, which keeps no state.

    Not ``torch.optim.SGD`` itself: a shard of plain SGD needs none of an optimizer's
    bookkeeping (the stateful optimizers are torch's, without their compiler guards: see
    ``_WithoutCompilerGuards``). Has what a shard uses of an optimizer, in torch's layout:
    ``param_groups``, ``state_dict``/``load_state_dict`` and ``step``.
    """

    checkpoint_name = "SGD"
    """The optimizer a checkpoint names: torch's SGD writes the same (empty) state."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float) -> None:
        self.param_groups = [
            {
                "params": list(params),
                "lr": lr,
                "momentum": 0,
                "dampening": 0,
                "weight_decay": 0,
                "nesterov": False,
                "maximize": False,
            }
        ]

    def step(self) -> None:
        """Update every parameter that has a ``grad``."""
        group = self.param_groups[0]
        params = [param for param in group["params"] if param.grad is not None]
        if params:
            torch._foreach_add_(params, [param.grad for param in params], alpha=-group["lr"])

    def state_dict(self) -> dict:
        group = dict(self.param_groups[0])
        group["params"] = list(range(len(group["params"])))
        return {"state": {}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take the learning rate of ``state_dict`` (torch's layout, one group).

        Raises:
            ValueError: it holds per-parameter state (momentum buffers) or another number of
                groups or parameters.
        """
        if state_dict["state"]:
            raise ValueError("the saved SGD state has momentum buffers: this shard runs plain SGD")
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.param_groups[0]["params"]):
            raise ValueError("the saved SGD state is of another set of parameters")
        self.param_groups[0]["lr"] = groups[0]["lr"]


class _WithoutCompilerGuards:
    """torch's optimizer methods a shard calls, run without the guards that import
    ``torch._dynamo`` on first use (``unguarded.py``): building a shard's optimizer no
    longer costs about as much CPU again as ``import torch``. Placed before the torch class
    among the bases; the update, state and checkpoint layout are that class's own."""

    _torch_class: type[torch.optim.Optimizer]

    @property
    def checkpoint_name(self) -> str:
        """The torch class a checkpoint names: the state is that class's."""
        return self._torch_class.__name__

    def add_param_group(self, param_group: dict) -> None:
        call_unguarded("add_param_group", self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        call_unguarded("zero_grad", self, set_to_none)

    def state_dict(self) -> dict:
        return call_unguarded("state_dict", self)

    def load_state_dict(self, state_dict: dict) -> None:
        call_unguarded("load_state_dict", self, state_dict)

    def step(self, closure=None):
        return step_unguarded(self._torch_class.step, self, closure)


class ServerMomentumSGD(_WithoutCompilerGuards, torch.optim.SGD):
    """``torch.optim.SGD`` (with momentum) as a shard runs it."""

    _torch_class = torch.optim.SGD


class ServerAdagrad(_WithoutCompilerGuards, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` as a shard runs it."""

    _torch_class = torch.optim.Adagrad


class ServerAdam(_WithoutCompilerGuards, torch.optim.Adam):
    """``torch.optim.Adam`` as a shard runs it."""

    _torch_class = torch.optim.Adam


ServerOptimizer = torch.optim.Optimizer | PlainSGD
ServerOptimizerFactory = Callable[[list[torch.Tensor]], ServerOptimizer]


def optimizer_name(optimizer: ServerOptimizer) -> str:
    """What a checkpoint calls ``optimizer``'s state (its class name; ``PlainSGD``: SGD)."""
    return getattr(optimizer, "checkpoint_name", type(optimizer).__name__)


def _is_fraction(value: object) -> bool:
    """Whether ``value`` is a real number in [0, 1) (not a bool, not nan)."""
    return is_amount(value, zero_ok=True) and value < 1  # type: ignore[operator]


def server_optimizer_factory(
    name: str,
    *,
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
) -> ServerOptimizerFactory:
    """A factory that builds the named optimizer over a shard's slice tensors.

    Args:
        name: One of SERVER_OPTIMIZER_NAMES.
        lr: Learning rate (gamma of Adagrad in Dean et al. 2012).
        momentum: Momentum factor of "momentum".
        betas: Adam's (beta1, beta2).
        eps: Adagrad's (default 1e-10) or Adam's (default 1e-8) epsilon.

    Raises:
        ValueError: unknown name or out-of-range hyperparameter, naming it.
    """
    if name not in SERVER_OPTIMIZER_NAMES:
        raise ValueError(f"unknown server optimizer {name!r} (choices: {SERVER_OPTIMIZER_NAMES})")
    problem = amount_problem(lr, zero_ok=True, most=MAX_RATE)
    if problem is not None:
        raise ValueError(f"server lr {problem}, got {lr!r}")
    if not _is_fraction(momentum):
        raise ValueError(f"server momentum must be in [0, 1), got {momentum!r}")
    if not isinstance(betas, tuple | list) or len(betas) != 2 or not all(map(_is_fraction, betas)):
        raise ValueError(f"server betas must be two numbers in [0, 1), got {betas!r}")
    if eps is not None and amount_problem(eps, most=MAX_RATE) is not None:
        raise ValueError(f"server eps {amount_problem(eps, most=MAX_RATE)}, got {eps!r}")
    if name == "sgd":
        return lambda params: PlainSGD(params, lr=lr)
    if name == "momentum":
        return lambda params: ServerMomentumSGD(params, lr=lr, momentum=momentum)
    if name == "adagrad":
        return lambda params: ServerAdagrad(params, lr=lr, eps=eps or 1e-10)
    return lambda params: ServerAdam(params, lr=lr, betas=betas, eps=eps or 1e-8)


def server_optimizer_from_config(config: ServerConfig) -> ServerOptimizerFactory:
    """The factory of a job's server section (its optimizer and hyperparameters)."""
    return server_optimizer_factory(
        config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        betas=config.betas,
        eps=config.eps,
    )


def _is_plain_sgd(optimizer: ServerOptimizer) -> bool:
    """Whether ``optimizer``'s step is ``w -= lr * g`` (``PlainSGD``, or torch's SGD without
    momentum, weight decay or maximize)."""
    if isinstance(optimizer, PlainSGD):
        return True
    torch_sgd = type(optimizer) in (torch.optim.SGD, ServerMomentumSGD)
    if not torch_sgd or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    return not (group["momentum"] or group["weight_decay"] or group["maximize"])


def apply_update(
    optimizer: ServerOptimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> None:
    """One optimizer step of ``params`` with ``grads`` (the grads are used, not copied)."""
    if _is_plain_sgd(optimizer):
        # The same update as SGD.step() without its per-call bookkeeping (~20x less overhead
        # for small slices); plain SGD keeps no state, so its state_dict is unchanged.
        torch._foreach_add_(list(params), list(grads), alpha=-optimizer.param_groups[0]["lr"])
        return
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    optimizer.step()
    for param in params:
        param.grad = None
