"""What DownpourSGD accepts as its parameters and param groups: each group's ``lr`` a rate and
its other SGD settings plain SGD's, each parameter one the shards can hold and pulled values
can be loaded into, the names the shards know the parameters by and the form (shape, dtype,
device) each was given in. Checks only: it changes no tensor and talks to no shard.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import nn

from distbelief.config import MAX_RATE, amount_problem
from distbelief.wire.dtypes import dtype_name


def rate_value(lr: object) -> object:
    """``lr`` as a float where it is a one-element floating tensor or 0-d numpy array, or another
    kind of real number (a numpy scalar), as torch.optim takes them for a group's ``lr`` (a
    compiled optimizer's, or a scheduler's: LambdaLR times a numpy float32 is one), else as
    it is."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.dtype.is_floating_point:
        return lr.item()
    if isinstance(lr, np.ndarray) and lr.ndim == 0 and lr.dtype.kind in "fiu":
        return float(lr.item())  # np.array(0.1), which torch.optim.SGD takes as it takes the number
    if isinstance(lr, numbers.Real) and not isinstance(lr, int | float):
        return float(lr)
    return lr


def check_rates(param_groups: list[dict]) -> None:
    """Refuses a param group whose ``lr`` is no rate (``amount_problem``, at most ``MAX_RATE``):
    NaN would spread to every replica through the shards, a rate past float32's range fails
    the tensors' arithmetic.

    Raises:
        ValueError: naming the group (its index) and its ``lr``.
    """
    for index, group in enumerate(param_groups):
        problem = amount_problem(rate_value(group["lr"]), zero_ok=True, most=MAX_RATE)
        if problem is not None:
            raise ValueError(f"param group {index}: lr {problem}, got {group['lr']!r}")


UNAPPLIED_DEFAULTS = {
    "momentum": 0,
    "dampening": 0,
    "weight_decay": 0,
    "nesterov": False,
    "maximize": False,
}
"""torch.optim.SGD's settings besides ``lr``, at the values that leave its step plain SGD:
the step DownpourSGD applies (and the shards' optimizer is set on the shards)."""


_SET_BY = {
    "momentum": "; OneCycleLR and CyclicLR set it unless given cycle_momentum=False",
}
"""What sets a setting a user did not: said where it is refused."""


def check_plain_sgd(param_groups: list[dict]) -> None:
    """Refuses a param group that sets one of SGD's other settings (``UNAPPLIED_DEFAULTS``)
    to another value: a group ported from torch.optim.SGD would otherwise train without it.

    Raises:
        ValueError: naming the group (its index), the setting and its value.
    """
    for index, group in enumerate(param_groups):
        for name, plain in UNAPPLIED_DEFAULTS.items():
            if name in group and group[name] != plain:
                raise ValueError(
                    f"param group {index}: {name} is not applied by DownpourSGD (its step is "
                    f"plain SGD at the group's lr), got {group[name]!r}{_SET_BY.get(name, '')}"
                )


def check_param_groups(param_groups: list[dict]) -> None:
    """Refuses a param group DownpourSGD would not train as it says: its ``lr`` no rate
    (``check_rates``) or one of SGD's other settings not plain (``check_plain_sgd``). Run by
    the constructor, by ``step()`` and by ``load_state_dict()``: a scheduler, a script or a
    torch.optim.SGD state dict may set them later.

    Raises:
        ValueError: naming the group (its index), the setting and its value.
    """
    check_rates(param_groups)
    check_plain_sgd(param_groups)


def named_params(param_groups: list[dict], model: nn.Module | None) -> list[tuple[str, object]]:
    """Each parameter with the name the shards know it by: its name in ``model``, else the
    name it was given with (``model.named_parameters()``: torch keeps them as a group's
    ``param_names``) where those are unique (groups of submodules' parameters may repeat
    ``weight``), else ``param.I`` by its position."""
    names = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
    params = [p for group in param_groups for p in group["params"]]
    given = [
        name
        for group in param_groups
        for name in group.get("param_names", [None] * len(group["params"]))
    ]
    if None in given or len(set(given)) < len(given):
        given = [None] * len(params)
    return [(names.get(id(p)) or given[i] or f"param.{i}", p) for i, p in enumerate(params)]


def check_params(named: list[tuple[str, torch.Tensor]]) -> None:
    """Refuses, by name, a parameter the shards cannot hold or this optimizer cannot load
    pulled values into: one given twice (the shards would hold it twice and its gradient would
    be applied twice), one on the meta device (no values to initialise the shards with), one of
    a dtype the wire does not carry or not floating, or one whose elements share memory (an
    ``expand``-ed tensor: a pulled value cannot be written into it).

    Raises:
        ValueError: naming the parameter.
    """
    seen: dict[int, str] = {}
    for name, param in named:
        if id(param) in seen:
            raise ValueError(
                f"parameter {name!r} is given twice (also as {seen[id(param)]!r}): "
                "give each parameter once"
            )
        seen[id(param)] = name
        if param.is_meta:
            raise ValueError(
                f"parameter {name!r} is on the meta device: it has no values for the shards "
                "(materialise the model, e.g. with to_empty() and an initialisation, first)"
            )
        try:
            dtype_name(param.dtype)
        except ValueError:
            raise ValueError(
                f"parameter {name!r}: dtype {param.dtype} cannot travel to the shards"
            ) from None
        if not param.dtype.is_floating_point:
            # The shards apply every push to every tensor: an integer one fails there, at the
            # first push, as a RemoteError.
            raise ValueError(
                f"parameter {name!r}: dtype {param.dtype} is not floating, and only floating "
                "parameters train: leave it out of the parameters given (or make it a buffer)"
            )
        if param.layout == torch.strided and param.numel() > 1 and _has_internal_overlap(param):
            raise ValueError(
                f"parameter {name!r}: its elements share memory (an expand()-ed tensor, say), "
                "so pulled values cannot be loaded into it: give it memory of its own (clone())"
            )


def _has_internal_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` are one memory location (torch's own check, where
    this torch has it; else a zero stride of a dimension longer than 1)."""
    check = getattr(torch, "_debug_has_internal_overlap", None)
    if check is not None:
        return check(tensor) == 1  # 0: no, 1: yes, 2: too complex to tell
    return any(
        stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape, strict=True)
    )


def common_device(params: list[torch.Tensor]) -> torch.device:
    """The parameters' device; the host when they span several (each then goes through it)."""
    devices = {p.device for p in params}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def param_form(param: torch.Tensor) -> tuple:
    return param.shape, param.dtype, param.device
