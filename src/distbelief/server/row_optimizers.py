"""Row optimizers: how a shard turns the summed gradient rows of a push into embedding updates.

A row optimizer holds hyperparameters only; the per-row state it needs (accumulators, moments)
lives in the row table beside the values, so that it is gathered, evicted and checkpointed with
its row. ``apply`` works on gathered rows (one row per unique id, duplicates already summed by
the worker) and updates them in place, vectorised over the rows; the table writes them back.
Each optimizer matches its ``torch.optim`` counterpart on ``nn.Embedding(sparse=True)``:
untouched rows keep their values and their state.
"""

from __future__ import annotations

import abc
import math

import torch


def _check_lr(lr: float) -> None:
    if lr < 0:
        raise ValueError(f"row optimizer lr must be >= 0, got {lr}")


def _check_eps(eps: float) -> None:
    if eps <= 0:
        raise ValueError(f"row optimizer eps must be > 0, got {eps}")


class RowOptimizer(abc.ABC):
    """The interface: per-row state it needs, and one update of gathered rows.

    Attributes:
        name: A short name, stored in checkpoints so a table is not loaded with another kind.
    """

    name = "row_optimizer"
    flag_name = ""
    """Its name as ``--row-optimizer`` takes it (the stored ``name`` predates the flag)."""

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """The per-row state tensors for rows of ``dim`` values: name -> shape of one row."""
        return {}

    def initial_state(self, name: str) -> float:
        """The value a new row's state tensor ``name`` starts at."""
        return 0.0

    @abc.abstractmethod
    def apply(
        self,
        values: torch.Tensor,
        state: dict[str, torch.Tensor],
        grads: torch.Tensor,
        step: int,
    ) -> None:
        """Updates ``values`` [n, D] and ``state`` (each [n, *shape]) in place.

        Args:
            values: The gathered rows of the unique ids pushed.
            state: The gathered per-row state, as named by ``state_shapes``.
            grads: The summed gradient rows, [n, D], same order as ``values``.
            step: The table's update count, this update included (1 for the first).
        """


class RowSGD(RowOptimizer):
    """Plain SGD: ``w -= lr * g``. No state."""

    name = "sgd"
    flag_name = "sgd"

    def __init__(self, lr: float) -> None:
        _check_lr(lr)
        self.lr = lr

    def apply(self, values, state, grads, step) -> None:
        values.add_(grads, alpha=-self.lr)


class RowAdagrad(RowOptimizer):
    """Element-wise Adagrad, as ``torch.optim.Adagrad`` on a sparse gradient:
    ``acc += g^2; w -= lr * g / (sqrt(acc) + eps)`` on the touched rows. D floats per row."""

    name = "adagrad"
    flag_name = "adagrad"

    def __init__(self, lr: float, eps: float = 1e-10, initial_accumulator_value: float = 0.0):
        _check_lr(lr)
        _check_eps(eps)
        if initial_accumulator_value < 0:
            raise ValueError(
                f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}"
            )
        self.lr = lr
        self.eps = eps
        self.initial_accumulator_value = initial_accumulator_value

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        return {"sum": (dim,)}

    def initial_state(self, name: str) -> float:
        return float(self.initial_accumulator_value)

    def apply(self, values, state, grads, step) -> None:
        total = state["sum"]
        total.addcmul_(grads, grads)
        values.add_(grads / total.sqrt().add_(self.eps), alpha=-self.lr)


class RowWiseAdagrad(RowOptimizer):
    """Row-wise Adagrad: one accumulator per row, ``acc += mean(g^2 over the row);
    w -= lr * g / (sqrt(acc) + eps)``. One float of state per row instead of D."""

    name = "rowwise_adagrad"
    flag_name = "rowwise-adagrad"

    def __init__(self, lr: float, eps: float = 1e-10) -> None:
        _check_lr(lr)
        _check_eps(eps)
        self.lr = lr
        self.eps = eps

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        return {"sum": (1,)}

    def apply(self, values, state, grads, step) -> None:
        total = state["sum"]
        total.add_(grads.square().mean(dim=1, keepdim=True))
        values.add_(grads / total.sqrt().add_(self.eps), alpha=-self.lr)


class LazyAdam(RowOptimizer):
    """Adam on the touched rows only, as ``torch.optim.SparseAdam``: only pushed rows' moments
    advance, and the bias correction uses the table's update count (SparseAdam keeps one step
    per parameter, advanced on every ``step()``, not one per row). 2*D floats per row."""

    name = "lazy_adam"
    flag_name = "adam"

    def __init__(
        self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        _check_lr(lr)
        _check_eps(eps)
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"row optimizer betas must be two numbers in [0, 1), got {betas}")
        self.lr = lr
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps

    def state_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (dim,), "exp_avg_sq": (dim,)}

    def apply(self, values, state, grads, step) -> None:
        if step < 1:
            raise ValueError(f"LazyAdam step must be >= 1, got {step}")
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        # The same operation order as SparseAdam: m += (g - m) * (1 - beta1), etc.
        exp_avg.add_((grads - exp_avg).mul_(1 - beta1))
        exp_avg_sq.add_((grads.square() - exp_avg_sq).mul_(1 - beta2))
        step_size = self.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        values.add_(exp_avg / exp_avg_sq.sqrt().add_(self.eps), alpha=-step_size)


def flag_name_of(name: str) -> str:
    """The ``--row-optimizer`` value of the row optimizer a checkpoint names ``name`` (the
    name itself when no row optimizer has it)."""
    for optimizer in (RowSGD, RowAdagrad, RowWiseAdagrad, LazyAdam):
        if optimizer.name == name:
            return optimizer.flag_name
    return name
